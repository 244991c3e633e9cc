"""Synthetic shapes dataset: determinism, COCO validity, label-map exercise."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO

from focaldet.data import CocoDetection, write_synthetic_coco
from focaldet.data.cli import main
from focaldet.data.synth import CATEGORY_IDS, SHAPES, _shape_mask, render_image
from focaldet.errors import ConfigError


def test_deterministic_for_a_seed(tmp_path):
    a = write_synthetic_coco(tmp_path / "a", num_images=12, seed=3, image_size=96)
    b = write_synthetic_coco(tmp_path / "b", num_images=12, seed=3, image_size=96)
    c = write_synthetic_coco(tmp_path / "c", num_images=12, seed=4, image_size=96)
    assert a.train_ann.read_text() == b.train_ann.read_text()
    assert a.val_ann.read_text() == b.val_ann.read_text()
    assert (a.images / "synth_000005.jpg").read_bytes() == (b.images / "synth_000005.jpg").read_bytes()
    assert a.train_ann.read_text() != c.train_ann.read_text()


def test_structure_and_statistics(tmp_path):
    paths = write_synthetic_coco(tmp_path, num_images=120, seed=0, num_classes=5, image_size=64, val_fraction=0.2)
    train, val = (json.loads(p.read_text()) for p in (paths.train_ann, paths.val_ann))
    assert len(train["images"]) == 96 and len(val["images"]) == 24
    assert not {i["id"] for i in train["images"]} & {i["id"] for i in val["images"]}
    cat_ids = [c["id"] for c in train["categories"]]
    assert cat_ids == list(CATEGORY_IDS[:5]) and cat_ids != list(range(1, 6))  # non-contiguous
    assert [c["name"] for c in train["categories"]] == list(SHAPES[:5])

    anns = train["annotations"] + val["annotations"]
    images = train["images"] + val["images"]
    with_boxes = {a["image_id"] for a in anns}
    assert any(i["id"] not in with_boxes for i in images)  # some empty images
    counts = {c: sum(a["category_id"] == c for a in anns) for c in cat_ids}
    assert counts[cat_ids[0]] > 2 * max(counts[c] for c in cat_ids[1:])  # imbalance
    for a in anns:
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64 and w >= 1 and h >= 1
        assert a["iscrowd"] == 0 and a["area"] == w * h

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(paths.train_ann))
    assert len(coco.getImgIds()) == 96 and sorted(coco.getCatIds()) == cat_ids


@pytest.mark.parametrize("shape", SHAPES)
def test_shapes_fill_their_box(shape):
    """Boxes are tight: every shape's mask touches all four sides of its patch."""
    rng = np.random.default_rng(0)
    for w, h in [(4, 4), (9, 14), (31, 24), (90, 67)]:
        mask = _shape_mask(shape, w, h, rng) > 0
        assert mask.shape == (h, w)
        assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any(), (shape, w, h)


def test_render_image_boxes_inside_image():
    rng = np.random.default_rng(5)
    for _ in range(20):
        image, objects = render_image(rng, size=96, num_classes=8)
        assert image.shape == (96, 96, 3) and image.dtype == np.uint8
        for cls, (x, y, w, h) in objects:
            assert 0 <= cls < 8 and x >= 0 and y >= 0 and x + w <= 96 and y + h <= 96 and min(w, h) >= 1


def test_loads_as_dataset(synth_coco):
    ds = CocoDetection(synth_coco.train_ann, synth_coco.images)
    assert ds.label_map.cat_ids == [1, 3, 7, 8]
    labels = [int(label) for i in range(len(ds)) for label in ds[i]["labels"]]
    assert set(labels) <= {0, 1, 2, 3} and len(labels) > 20


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="num_classes"):
        write_synthetic_coco(tmp_path, num_images=4, num_classes=9)
    with pytest.raises(ConfigError, match="num_images"):
        write_synthetic_coco(tmp_path, num_images=1)


def test_cli(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["synth", "--out", str(out), "--num-images", "6", "--seed", "2", "--classes", "3", "--size", "64"]) == 0
    assert "instances_train.json" in capsys.readouterr().out
    data = json.loads((out / "annotations" / "instances_train.json").read_text())
    assert [c["id"] for c in data["categories"]] == [1, 3, 7]
    assert len(list((out / "images").glob("*.jpg"))) == 6


def test_crowded_images_hold_hundreds_of_separate_small_objects(tmp_path):
    import torch
    from torchvision.ops import box_iou

    paths = write_synthetic_coco(tmp_path, num_images=2, seed=0, num_classes=3, image_size=256, crowded=True)
    anns = json.loads(paths.train_ann.read_text())["annotations"] + json.loads(paths.val_ann.read_text())["annotations"]
    per_image = {}
    for a in anns:
        per_image.setdefault(a["image_id"], []).append(a["bbox"])
    for boxes in per_image.values():
        assert 75 <= len(boxes) <= 250  # 300-1000 per 512 px image, scaled to 256 px
        b = torch.tensor(boxes)
        b[:, 2:] += b[:, :2]
        assert (b[:, 2:] - b[:, :2]).max() <= 256 / 9 and (b >= 0).all() and (b <= 256).all()
        iou = box_iou(b, b).fill_diagonal_(0)
        assert iou.max() == 0  # one object per grid cell: none overlaps another
