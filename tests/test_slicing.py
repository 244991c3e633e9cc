"""Sliced inference (`focaldet.inference.slicing`): window geometry, merge, tiles, validate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from torchvision.ops import nms

from focaldet.api import Detector
from focaldet.cli import main
from focaldet.data.synth import render_image
from focaldet.errors import ConfigError
from focaldet.evaluation import detections_to_coco
from focaldet.inference import Slicing, merge_detections, shift_boxes, slice_windows
from focaldet.config.inputs import InputSettings
from focaldet.models import PostProcess, ResNetBackbone, RetinaNet

from helpers import tiny_config

pytestmark = pytest.mark.filterwarnings("ignore")


def _tiny_model(**post) -> RetinaNet:
    torch.manual_seed(0)
    return RetinaNet(3, backbone=ResNetBackbone(depth=18, norm="frozen_bn", freeze_at=0), fpn_channels=32,
                     num_convs=1, postprocess=PostProcess(**{"score_thresh": 0.0, "topk_candidates": 20, **post})).eval()


def test_windows_match_hand_computed_ones():
    # SAHI's geometry: step size - int(overlap * size), the last window shifted back inside the image
    assert slice_windows(1000, 1000, 512, 0.2)[:, 0].unique().tolist() == [0, 410, 488]  # 102 px overlap
    assert slice_windows(300, 200, 128, 0.25).tolist() == [  # 32 px overlap, rows outer
        [0, 0, 128, 128], [72, 0, 200, 128],
        [0, 96, 128, 224], [72, 96, 200, 224],
        [0, 172, 128, 300], [72, 172, 200, 300]]
    assert slice_windows(256, 256, 128, 0.0).tolist() == [  # exact tiles, nothing shifted
        [0, 0, 128, 128], [128, 0, 256, 128], [0, 128, 128, 256], [128, 128, 256, 256]]
    assert slice_windows(100, 300, 128, 0.0).tolist() == [  # shorter than a window: one of its length
        [0, 0, 128, 100], [128, 0, 256, 100], [172, 0, 300, 100]]
    assert slice_windows(50, 60, 512).tolist() == [[0, 0, 60, 50]]
    assert Slicing.of({"size": 64}).windows(128, 128)[:3, 0].tolist() == [0, 52, 64]  # default overlap 0.2
    for bad in ({"overlap": 1.0}, {"size": 0}, {"batch_size": 0}, {"sise": 3}):
        with pytest.raises(ConfigError, match="slicing"):
            Slicing.of(bad)


def test_merge_is_class_aware_nms():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 5 + torch.rand(300, 2, generator=g) * 30], 1)
    scores, labels = torch.rand(300, generator=g), torch.randint(0, 3, (300,), generator=g)
    parts = [{"boxes": boxes[i::3], "scores": scores[i::3], "labels": labels[i::3]} for i in range(3)]
    merged = merge_detections(parts, 0.5, max_dets=40)
    kept = torch.cat([torch.nonzero(labels == c).squeeze(1)[nms(boxes[labels == c], scores[labels == c], 0.5)]
                      for c in range(3)])  # a direct per-class NMS
    kept = kept[scores[kept].argsort(descending=True)][:40]
    torch.testing.assert_close(merged["boxes"], boxes[kept], rtol=0, atol=0)
    torch.testing.assert_close(merged["labels"], labels[kept], rtol=0, atol=0)
    assert (merged["scores"].diff() <= 0).all()
    same = {"boxes": torch.tensor([[0.0, 0, 10, 10]] * 2), "scores": torch.tensor([0.9, 0.8]),
            "labels": torch.tensor([0, 1])}
    assert len(merge_detections([same], 0.5, 10)["scores"]) == 2  # another class is not suppressed
    torch.testing.assert_close(shift_boxes(torch.tensor([[1.0, 2, 3, 4]]), (10, 20)), torch.tensor([[11.0, 22, 13, 24]]))


def test_tiles_give_the_per_tile_detections_shifted():
    """A 2 x 2 mosaic of four 64 px images, windows = tiles, no overlap, no full-image pass:
    the detections are each tile's own, shifted into the mosaic (the eval size, 96 px,
    resizes tiles and windows alike)."""
    rng = np.random.default_rng(0)
    tiles = [render_image(rng, 64, 3)[0] for _ in range(4)]
    mosaic = np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)  # (128, 128, 3)
    offsets = [(0, 0), (64, 0), (0, 64), (64, 64)]
    det = Detector(_tiny_model(detections_per_img=400), InputSettings(96, 96, 128), [1, 2, 5], ["a", "b", "c"])
    per_tile = det.predict(tiles, batch_size=4)
    boxes = torch.cat([shift_boxes(r["boxes"], off) for r, off in zip(per_tile, offsets)])
    scores = torch.cat([r["scores"] for r in per_tile])
    labels = torch.cat([r["labels"] for r in per_tile])
    order = scores.argsort(descending=True)
    assert all(len(r["scores"]) > 5 for r in per_tile)  # every tile contributes (score_thresh 0)

    for cap in (400, 20):  # no cap reached, then the merge keeps the best `cap` of the mosaic
        det.model.postprocess.detections_per_img = cap
        out = det.predict(mosaic, slicing=Slicing(size=64, overlap=0.0, full_image=False, batch_size=4))[0]
        top = order[:cap]
        assert len(out["scores"]) == len(top)
        torch.testing.assert_close(out["scores"], scores[top], rtol=0, atol=1e-6)
        torch.testing.assert_close(out["boxes"], boxes[top], rtol=0, atol=1e-4)
        assert out["labels"].tolist() == labels[top].tolist()
        assert out["category_ids"].tolist() == [[1, 2, 5][i] for i in labels[top].tolist()]


@pytest.mark.slow  # trains (a fit), exports or starts a process: see docs/testing.md
def test_validate_with_slicing_reports_original_pixels(tmp_path, make_coco):
    """`focaldet validate --model.slicing...`: the data module hands over the 256x128 images
    unresized (CLI link), each window and the whole image run at the 64 px eval size, and the
    evaluated boxes are in original pixels -- those of `Detector.predict(..., slicing=...)`."""
    ann, images = make_coco(images=[(256, 128), (200, 150)],
                            annotations=[{"image_id": 1, "category_id": 1, "bbox": [180, 90, 12, 10]},
                                         {"image_id": 2, "category_id": 1, "bbox": [10, 20, 30, 40]}])
    data = type("Data", (), {"train_ann": ann, "val_ann": ann, "images": images})
    cfg = tiny_config(tmp_path, data, **{"data.min_size": 64, "data.max_size": 128})
    post = tmp_path / "post.yaml"
    post.write_text(yaml.safe_dump({"model": {"model": {"postprocess": {"class_path": "focaldet.models.PostProcess", "init_args": {
        "score_thresh": 0.0, "topk_candidates": 10, "detections_per_img": 1000}}}}}))
    slicing = ["--model.slicing.size", "64", "--model.slicing.overlap", "0.2"]
    main(["validate", "-c", str(cfg), "-c", str(post), *slicing, "--trainer.logger", "false"])
    logged = json.loads((tmp_path / "run" / "val_detections.json").read_text())
    assert max(e["bbox"][0] + e["bbox"][2] for e in logged if e["image_id"] == 1) > 200  # not 128-px pixels

    from focaldet.cli import FocaldetCLI
    from focaldet.data import CocoDataModule
    from focaldet.engine.module import RetinaNetModule

    cli = FocaldetCLI(RetinaNetModule, CocoDataModule, args=["-c", str(cfg), "-c", str(post), *slicing],
                      run=False, trainer_defaults={"logger": False})  # the same seed: the same random weights
    assert cli.datamodule.eval_original_size and "slicing" not in cli.model.hparams
    det = Detector(cli.model.model.eval(), cli.model.inputs, cli.model.label_to_cat_id, cli.model.class_names)
    api = detections_to_coco([1, 2], det.predict([images / "img_1.jpg", images / "img_2.jpg"],
                                                 slicing={"size": 64, "overlap": 0.2}), det.category_ids)
    key = lambda e: (e["image_id"], -e["score"], e["bbox"])  # noqa: E731
    assert len(api) == len(logged) > 0
    for a, b in zip(sorted(api, key=key), sorted(logged, key=key)):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["score"] == pytest.approx(b["score"], abs=2e-5)
        assert a["bbox"] == pytest.approx(b["bbox"], abs=2e-3)

    cli.datamodule.eval_original_size = False  # resized images cannot be sliced: one line naming the file
    cli.datamodule.setup("validate")
    batch = next(iter(cli.datamodule.val_dataloader()))
    with pytest.raises(ConfigError, match="img_1.jpg arrives resized"):
        cli.model._detect_sliced(batch)
