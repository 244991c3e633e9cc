"""Test-time augmentation: flipped views' boxes map back exactly, scales map back to the
original pixels, and the merge is class-wise NMS over the views."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from focaldet.errors import ConfigError
from focaldet.inference.slicing import merge_detections
from focaldet.inference.tta import TTA, flip_boxes, tta_detections, view_settings
from focaldet.config.inputs import InputSettings
from focaldet.structures.boxes import rescale_boxes

# two objects: red (label 0) at x 10..49, y 20..59; green (label 1) at x 70..119, y 5..34 (inclusive)
RECTS = {0: (10, 20, 50, 60), 1: (70, 5, 120, 35)}  # xyxy pixel edges


def _image(h=96, w=128) -> torch.Tensor:
    img = np.zeros((h, w, 3), np.uint8)
    for label, (x0, y0, x1, y1) in RECTS.items():
        img[y0:y1, x0:x1, label] = 255
    return torch.from_numpy(img).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


class BrightBoxDetector:
    """A stand-in for the model: for each colour channel, the box around its bright pixels in
    the resized image, mapped to original pixels; score = resized height / 1000 (the larger
    view wins the merge); every image it saw is kept."""

    def __init__(self):
        self.seen: list[np.ndarray] = []

    def __call__(self, batch: dict) -> list[dict]:
        out = []
        for img, (h, w), orig in zip(batch["images"], batch["image_sizes"].tolist(), batch["orig_sizes"].tolist()):
            img = img[:, :h, :w]
            self.seen.append(img.permute(1, 2, 0).numpy().copy())
            boxes, labels = [], []
            for label in RECTS:
                ys, xs = torch.nonzero(img[label] > 127, as_tuple=True)
                boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
                labels.append(label)
            boxes = rescale_boxes(torch.tensor(boxes, dtype=torch.float32), (h, w), orig)
            out.append({"boxes": boxes, "scores": torch.full((len(labels),), h / 1000), "labels": torch.tensor(labels)})
        return out


def test_flip_boxes_is_its_own_inverse_and_exact():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 60.0], [0.0, 0.0, 128.0, 96.0]])
    torch.testing.assert_close(flip_boxes(boxes, 128), torch.tensor([[78.0, 20.0, 118.0, 60.0], [0.0, 0.0, 128, 96]]))
    assert torch.equal(flip_boxes(flip_boxes(boxes, 128), 128), boxes)


def test_flipped_view_maps_back_exactly():
    image, det = _image(), BrightBoxDetector()
    inputs = InputSettings(96, 128, 32)  # the image's own size: no resize
    out = tta_detections([image], det, TTA(flip=True), inputs, iou_threshold=0.5, max_dets=100)[0]
    assert len(det.seen) == 2
    np.testing.assert_array_equal(det.seen[1], det.seen[0][:, ::-1])  # the second view is the mirror image
    assert out["labels"].tolist() == [0, 1]  # one box per object: the two views merged
    for box, label in zip(out["boxes"], out["labels"].tolist()):
        assert box.tolist() == list(map(float, RECTS[label]))  # mapped back exactly


def test_scales_map_back_and_the_best_view_wins():
    image, det = _image(), BrightBoxDetector()
    inputs = InputSettings(96, 128, 32)
    tta = TTA(flip=True, scales=[48, 192])
    out = tta_detections([image, image], det, tta, inputs, iou_threshold=0.5, max_dets=100)
    assert tta.num_views == 4 and len(det.seen) == 8
    assert sorted({im.shape[:2] for im in det.seen}) == [(48, 64), (192, 256)]  # max_size scaled along
    for o in out:
        assert o["labels"].tolist() == [0, 1]
        torch.testing.assert_close(o["scores"], torch.tensor([0.192, 0.192]))  # the 192 px views' scores
        ref = torch.tensor([RECTS[0], RECTS[1]], dtype=torch.float32)
        assert (o["boxes"] - ref).abs().max() <= 0.5  # bilinear edges, mapped to original pixels


@pytest.mark.slow
def test_tta_of_a_model_is_nms_over_its_views(synth_coco):
    """A (random) RetinaNet: flip TTA equals class-wise NMS of predict(image) and the mirrored
    predict(mirrored image); no views = plain prediction."""
    from focaldet.data import read_image
    from focaldet.models import ResNetBackbone, RetinaNet

    torch.manual_seed(0)
    model = RetinaNet(3, backbone=ResNetBackbone(18, norm="frozen_bn", freeze_at=0), fpn_channels=32,
                      num_convs=1, min_size=128, max_size=128, size_divisibility=128).eval()
    with torch.no_grad():
        model.head.cls_logits.bias.fill_(-2.0)

    @torch.inference_mode()
    def detect(batch):
        dets = model.detect(model(model.normalize(batch["images"], batch["image_sizes"])), batch["image_sizes"])
        for d, size, orig in zip(dets, batch["image_sizes"].tolist(), batch["orig_sizes"].tolist()):
            d["boxes"] = rescale_boxes(d["boxes"], size, orig)
        return dets

    path = sorted(synth_coco.images.iterdir())[0]
    image = torch.from_numpy(read_image(path)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    inputs = InputSettings(128, 128, 128)
    plain = model.predict([image.float() / 255])[0]
    mirrored = model.predict([image.flip(-1).float() / 255])[0]
    mirrored["boxes"] = flip_boxes(mirrored["boxes"], image.shape[-1])
    post = model.postprocess
    ref = merge_detections([plain, mirrored], post.nms_thresh, post.detections_per_img)
    got = tta_detections([image], detect, TTA(flip=True), inputs, post.nms_thresh, post.detections_per_img)[0]
    assert len(plain["scores"]) > 10 and len(got["scores"]) == len(ref["scores"])
    torch.testing.assert_close(got["boxes"], ref["boxes"], rtol=0, atol=1e-3)
    torch.testing.assert_close(got["scores"], ref["scores"], rtol=0, atol=1e-5)
    assert torch.equal(got["labels"], ref["labels"])
    one = tta_detections([image], detect, TTA(), inputs, post.nms_thresh, post.detections_per_img)[0]
    torch.testing.assert_close(one["boxes"], plain["boxes"], rtol=0, atol=1e-3)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="tta.scales must be positive"):
        TTA(scales=[0, 640])
    with pytest.raises(ConfigError, match="unknown setting"):
        TTA.of({"flip": True, "scale": [640]})
    assert TTA.of({"flip": True, "scales": [640, 800]}) == TTA(True, (640, 800))
    with pytest.raises(ConfigError, match="standard eval resize"):
        view_settings(InputSettings(None, 1333, 128), 640)
    assert view_settings(InputSettings(800, 1333, 128), 400) == InputSettings(400, 666, 128)
