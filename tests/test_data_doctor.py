"""The data doctor: statistics, problems with their ids, anchor coverage, CLI exit codes."""

from __future__ import annotations

import json

import pytest
import torch
from torchvision.ops import box_iou

from focaldet.data import check_dataset
from focaldet.data.cli import main
from focaldet.modeling.anchors import best_anchor_iou
from focaldet.modeling.anchors import AnchorGenerator


def test_clean_dataset_report(synth_coco):
    report = check_dataset(synth_coco.train_ann, synth_coco.images, min_size=512, max_size=512)
    data = json.loads(synth_coco.train_ann.read_text())
    assert report.ok and not report.problems
    assert report.num_images == 12 and report.num_boxes == len(data["annotations"]) == report.num_trainable
    assert [c["id"] for c in report.categories] == [1, 3, 7, 8]
    assert sum(c["boxes"] for c in report.categories) == report.num_boxes
    assert sum(report.size_counts.values()) == report.num_boxes
    assert list(report.sqrt_area_percentiles) == ["p5", "p25", "p50", "p75", "p95"]
    assert report.imbalance_ratio >= 1
    assert 0 < report.anchor_coverage <= 1
    assert set(report.anchor_coverage_per_category) == {"circle", "square", "triangle", "cross"}
    text = report.format()
    assert "anchor coverage" in text and "result: OK" in text


def test_problems_name_offending_ids(make_coco):
    ann, images = make_coco(
        images=[(64, 48), (64, 48), (64, 48), (64, 48)],
        categories=[{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 5, "name": "unused"}],
        annotations=[
            {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]},
            {"image_id": 1, "category_id": 2, "bbox": [50, 10, 30, 20]},  # 2: outside
            {"image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 10]},  # 3: zero width: degenerate
            {"image_id": 9, "category_id": 1, "bbox": [5, 5, 10, 10]},  # 4: unknown image
            {"image_id": 2, "category_id": 4, "bbox": [5, 5, 10, 10]},  # 5: unknown category
            {"image_id": 2, "category_id": 1, "bbox": [63.5, 5, 10, 10]},  # 6: degenerate after clip
            {"image_id": 2, "category_id": 1, "bbox": [5, 5, 10]},  # 7: bad bbox
            {"image_id": 2, "category_id": 1, "bbox": [5, 5, -3, 10]},  # 8: negative width
            {"image_id": 2, "category_id": 1, "bbox": [5, True, 3, 10]},  # 9: a boolean is no number
            {"image_id": 2, "category_id": 1, "bbox": [5, float("nan"), 3, 10]},  # 10: NaN
            {"image_id": 1, "category_id": 2, "bbox": [50, 10, 30, 20]},  # 11: outside
        ],
    )
    data = json.loads(ann.read_text())
    data["annotations"][1]["id"] = 1  # duplicate annotation id (not checked further)
    data["images"].append(dict(data["images"][1]))  # duplicate image id 2
    data["images"].append({**data["images"][0], "id": 10})  # same file as image 1
    ann.write_text(json.dumps(data))
    (images / "img_3.jpg").unlink()  # missing file
    (images / "img_4.jpg").write_bytes(b"garbage")  # unreadable

    report = check_dataset(ann, images)
    assert not report.ok
    problems = dict((m.split(" (")[0], (s, m)) for s, m in report.problems)
    expected = {
        "duplicate image ids": ("error", "image 2 (img_2.jpg)"),
        "duplicate annotation ids": ("error", "annotation 1"),
        "annotations referring to an image id that is not in 'images'": ("error", "annotation 4 (image id 9)"),
        "annotations with a category id that is not in 'categories'": ("error", "annotation 5 (category id 4)"),
        "annotations without a valid bbox [x, y, w, h]": ("error", "annotation 7 (image 2, img_2.jpg): bbox [5, 5, 10] "
                                                          "is not a list of 4 numbers; annotation 8 (image 2, img_2.jpg): "
                                                          "bbox [5, 5, -3, 10] has a negative width or height; "
                                                          "annotation 9 (image 2, img_2.jpg): bbox [5, True, 3, 10] holds "
                                                          "a value that is not a finite number; annotation 10"),
        "missing image files": ("error", "image 3"),
        "undecodable image files": ("error", "image 4 (img_4.jpg): not a decodable image"),
        "image entries sharing a file_name": ("warning", "images 1 and 10 (img_1.jpg)"),
        "boxes <= 1 px wide or high after clipping, not trained on": ("warning", "annotation 3 (image 1, img_1.jpg); "
                                                                      "annotation 6 (image 2, img_2.jpg)"),
        "boxes extending outside their image, clipped for training": ("warning", "annotation 11 (image 1, img_1.jpg)"),
        "categories without boxes": ("warning", "category 5 (unused)"),
    }
    for description, (severity, example) in expected.items():
        assert description in problems, description
        assert problems[description][0] == severity
        assert example in problems[description][1], problems[description][1]
    assert [s for s, _ in report.problems] == sorted((s for s, _ in report.problems), key=lambda s: s != "error")
    assert "result: FAILED" in report.format()


def test_size_mismatch(make_coco):
    ann, images = make_coco(images=[(40, 30)])
    data = json.loads(ann.read_text())
    data["images"][0]["height"] = 31
    ann.write_text(json.dumps(data))
    report = check_dataset(ann, images)
    assert report.errors == ["images whose size differs from their JSON width/height (1): image 1 "
                             "(img_1.jpg): 40x30 (w x h) on disk but 40x31 in the JSON"]


def test_missing_image_folder(synth_coco, tmp_path):
    report = check_dataset(synth_coco.val_ann, tmp_path / "nowhere")
    assert report.errors == [f"image folder {tmp_path / 'nowhere'} does not exist"]


def test_malformed_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [], "categories": [}')
    report = check_dataset(path)
    assert not report.ok
    assert str(path) in report.errors[0] and "line 1, column 31" in report.errors[0]


@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_best_anchor_iou_matches_brute_force(offset):
    gen = AnchorGenerator(offset=offset)
    torch.manual_seed(0)
    xy = torch.rand(300, 2) * torch.tensor([600.0, 380.0])
    wh = torch.exp(torch.empty(300, 2).uniform_(1.0, 6.0))
    boxes = torch.cat([xy, (xy + wh).clamp(max=torch.tensor([640.0, 384.0]))], dim=1)
    padded = (384, 640)
    brute = box_iou(boxes, gen(gen.feature_shapes(*padded), "cpu")).max(dim=1).values
    torch.testing.assert_close(best_anchor_iou(boxes, padded, gen), brute)


def test_long_thin_and_tiny_boxes_lower_coverage(make_coco):
    ann, images = make_coco(
        images=[(640, 480)],
        annotations=[
            {"image_id": 1, "category_id": 1, "bbox": [100, 100, 60, 60]},  # fits an anchor
            {"image_id": 1, "category_id": 2, "bbox": [10, 300, 600, 8]},  # long and thin
            {"image_id": 1, "category_id": 2, "bbox": [300, 200, 4, 4]},  # tiny
        ],
        categories=[{"id": 1, "name": "ok"}, {"id": 2, "name": "odd"}],
    )
    report = check_dataset(ann, images)
    assert report.anchor_coverage == pytest.approx(1 / 3)
    assert report.anchor_coverage_per_category == {"ok": 1.0, "odd": 0.0}
    assert report.ok and any("low anchor coverage" in m and "odd 0.0%" in m for m in report.warnings)


def test_cli_exit_codes_and_json(synth_coco, make_coco, tmp_path, capsys):
    out = tmp_path / "report.json"
    code = main(["check", str(synth_coco.val_ann), "--images", str(synth_coco.images),
                 "--min-size", "128", "--max-size", "128", "--json", str(out)])
    assert code == 0
    assert "result: OK" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["ok"] and saved["num_images"] == 4 and saved["min_size"] == 128

    ann, images = make_coco(annotations=[{"image_id": 3, "category_id": 1, "bbox": [1, 1, 5, 5]}])
    assert main(["check", str(ann), "--images", str(images)]) == 1
    assert "annotation 1 (image id 3)" in capsys.readouterr().out


def test_bccd(bccd_dir):
    report = check_dataset(bccd_dir / "annotations" / "instances_train.json", bccd_dir / "images")
    assert report.ok
    assert len(report.categories) == 3
    assert [c["name"] for c in report.categories] == ["RBC", "WBC", "Platelets"]
    assert report.num_images == 205 and report.num_boxes == 2805
    assert 0 < report.anchor_coverage <= 1
    assert all(0 < v <= 1 for v in report.anchor_coverage_per_category.values())
