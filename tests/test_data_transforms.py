"""Augmentation pipelines from config, resize rule, collation, and scale bookkeeping."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from focaldet.data import (
    CocoDetection,
    ResizeShortestEdge,
    build_pipeline,
    build_transform,
    build_transforms,
    collate_detection,
)
from focaldet.errors import ConfigError
from focaldet.structures.boxes import rescale_boxes, xywh_to_xyxy


def _run(pipeline, image_hw=(100, 200), boxes=((10, 20, 50, 60), (120, 30, 190, 90)), labels=(0, 1)):
    image = np.zeros((*image_hw, 3), dtype=np.uint8)
    out = pipeline(image=image, bboxes=np.array(boxes, dtype=np.float32).reshape(-1, 4), labels=np.array(labels))
    return out["image"], np.asarray(out["bboxes"]).reshape(-1, 4), np.asarray(out["labels"])


@pytest.mark.parametrize(
    ("hw", "min_size", "max_size", "expected"),
    [
        ((480, 640), 800, 1333, (800, 1067)),  # shorter side to 800
        ((100, 1000), 800, 1333, (133, 1333)),  # longer side capped
        ((1000, 800), 400, 1333, (500, 400)),  # downscale
    ],
)
def test_resize_shortest_edge(hw, min_size, max_size, expected):
    image, boxes, _ = _run(build_pipeline([{"name": "ResizeShortestEdge", "min_size": min_size, "max_size": max_size}]),
                           image_hw=hw, boxes=((0, 0, hw[1], hw[0]),), labels=(0,))
    assert image.shape[:2] == expected
    np.testing.assert_allclose(boxes[0], [0, 0, expected[1], expected[0]], atol=1e-3)


def test_multiscale_train_samples_sizes_and_eval_uses_largest():
    train = build_transforms(True, min_size=[64, 96, 128], max_size=1000, hflip_prob=0.0, seed=0)
    shorter = {_run(train)[0].shape[0] for _ in range(30)}
    assert shorter == {64, 96, 128}
    assert _run(build_transforms(False, min_size=[64, 96, 128], max_size=1000))[0].shape[:2] == (128, 256)


def test_default_train_pipeline_flips_boxes_with_labels():
    pipe = build_transforms(True, min_size=100, max_size=1000, hflip_prob=1.0)
    _, boxes, labels = _run(pipe)
    # width 200: x -> 200 - x
    np.testing.assert_allclose(boxes, [[150, 20, 190, 60], [10, 30, 80, 90]], atol=1e-3)
    assert labels.tolist() == [0, 1]


def test_pipeline_from_config_flip_and_crop_keep_boxes_and_labels_consistent():
    config = [
        {"name": "HorizontalFlip", "p": 1.0},
        {"name": "Crop", "x_min": 0, "y_min": 0, "x_max": 100, "y_max": 100},
    ]
    image, boxes, labels = _run(build_pipeline(config))
    assert image.shape[:2] == (100, 100)
    # After the flip, box 0 is at x 150..190 (cropped away) and box 1 at x 10..80 (kept).
    assert labels.tolist() == [1]
    np.testing.assert_allclose(boxes, [[10, 30, 80, 90]], atol=1e-3)


def test_min_visibility_drops_mostly_cropped_boxes():
    config = [{"name": "Crop", "x_min": 0, "y_min": 0, "x_max": 130, "y_max": 100}]
    _, boxes, labels = _run(build_pipeline(config, min_visibility=0.5))
    assert labels.tolist() == [0]  # box 1 keeps only 10/70 of its width
    _, boxes, labels = _run(build_pipeline(config))
    assert labels.tolist() == [0, 1]
    np.testing.assert_allclose(boxes[1], [120, 30, 130, 90], atol=1e-3)


def test_nested_containers_and_dotted_path():
    transform = build_transform(
        {"name": "OneOf", "transforms": [{"name": "focaldet.data.transforms.ResizeShortestEdge", "min_size": 50}], "p": 1}
    )
    assert isinstance(transform.transforms[0], ResizeShortestEdge)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "NoSuchTransform"}, "unknown transform 'NoSuchTransform'"),
        ({"name": "my_missing_pkg.Aug"}, "cannot import transform 'my_missing_pkg.Aug'"),
        ({"name": "HorizontalFlip", "prob": 0.5}, r"transform HorizontalFlip: unknown argument\(s\) \['prob'\]"),
        ({"p": 0.5}, "'name' key"),
    ],
)
def test_bad_transform_config(spec, message):
    with pytest.raises(ConfigError, match=message):
        build_transform(spec)


def test_empty_boxes_pass_through():
    image, boxes, labels = _run(build_transforms(True, min_size=50, max_size=500), boxes=(), labels=())
    assert image.shape[:2] == (50, 100) and boxes.shape == (0, 4) and labels.shape == (0,)


def test_collate_pads_to_divisibility():
    def sample(h, w, g, image_id):
        return {
            "image": torch.full((3, h, w), 7, dtype=torch.uint8),
            "boxes": torch.ones(g, 4),
            "labels": torch.arange(g),
            "image_id": image_id,
            "orig_size": (h * 2, w * 2),
            "size": (h, w),
            "file_name": f"{image_id}.jpg",
        }

    batch = collate_detection([sample(100, 130, 2, 5), sample(120, 90, 0, 9)], size_divisibility=128)
    assert batch["images"].shape == (2, 3, 128, 256) and batch["images"].dtype == torch.uint8
    assert batch["images"][0, :, :100, :130].eq(7).all() and batch["images"][0, :, 100:].eq(0).all()
    assert batch["images"][1, :, :, 90:].eq(0).all()
    assert batch["image_sizes"].tolist() == [[100, 130], [120, 90]] and batch["image_sizes"].dtype == torch.int64
    assert batch["orig_sizes"].tolist() == [[200, 260], [240, 180]]
    assert batch["boxes"].shape == (2, 2, 4) and batch["boxes"][1].eq(0).all()
    assert batch["labels"].tolist() == [[0, 1], [-1, -1]]
    assert batch["image_ids"].tolist() == [5, 9] and batch["file_names"] == ["5.jpg", "9.jpg"]

    empty = collate_detection([sample(10, 10, 0, 1)])
    assert empty["boxes"].shape == (1, 0, 4) and empty["labels"].shape == (1, 0)


def _hwc_sample(seed, h, w):
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return {"image": torch.from_numpy(pixels).permute(2, 0, 1), "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.int64), "image_id": seed, "orig_size": (h, w),
            "size": (h, w), "file_name": f"{seed}.jpg"}


class _Samples(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return _hwc_sample(i, 50 + 30 * i, 70)


def test_collate_copies_pixels_once_into_a_channels_last_batch():
    """Samples are (3, H, W) views of (H, W, 3) arrays; the batch is NHWC in memory, also when a
    DataLoader worker builds it in shared memory (dirty padding would leak into the model)."""
    samples = [_Samples()[0], _Samples()[1]]
    assert samples[0]["image"].permute(1, 2, 0).is_contiguous()
    batch = collate_detection(samples)
    images = batch["images"]
    assert images.shape == (2, 3, 128, 128) and images.is_contiguous(memory_format=torch.channels_last)
    loader = torch.utils.data.DataLoader(_Samples(), batch_size=2, num_workers=1, collate_fn=collate_detection)
    worker_batch = next(iter(loader))
    from_worker = worker_batch["images"]
    assert from_worker.is_contiguous(memory_format=torch.channels_last) and from_worker.is_shared()
    # the small tensors came pickled, not in shared memory of their own; a plain dict arrives
    assert type(worker_batch) is dict and worker_batch.keys() == batch.keys()
    for key in ("image_sizes", "orig_sizes", "boxes", "labels", "image_ids"):
        assert not worker_batch[key].is_shared() and worker_batch[key].dtype == batch[key].dtype
        assert torch.equal(worker_batch[key], batch[key]), key
    assert worker_batch["file_names"] == batch["file_names"]
    for b in (images, from_worker):
        for i, s in enumerate(samples):
            h, w = s["size"]
            assert torch.equal(b[i, :, :h, :w], s["image"])
            assert b[i, :, h:].eq(0).all() and b[i, :, :, w:].eq(0).all()


def test_eval_pipeline_boxes_map_back_to_json(synth_coco):
    """JSON boxes -> eval resize -> padded batch -> rescale_boxes == JSON boxes (1e-3 px)."""
    data = json.loads(synth_coco.train_ann.read_text())
    # Non-square output sizes that do not divide evenly exercise the rounding.
    ds = CocoDetection(synth_coco.train_ann, synth_coco.images, build_transforms(False, min_size=203, max_size=1333))
    batch = collate_detection([ds[i] for i in range(len(ds))])
    assert batch["images"].shape[-2:] == (256, 256)
    checked = 0
    for i, image_id in enumerate(batch["image_ids"].tolist()):
        valid = batch["labels"][i] >= 0
        mapped = rescale_boxes(batch["boxes"][i][valid], batch["image_sizes"][i], batch["orig_sizes"][i])
        json_boxes = [a["bbox"] for a in data["annotations"] if a["image_id"] == image_id]
        expected = xywh_to_xyxy(torch.tensor(json_boxes, dtype=torch.float32).reshape(-1, 4))
        torch.testing.assert_close(mapped, expected, atol=1e-3, rtol=0)
        checked += len(json_boxes)
    assert checked > 20
