"""``focaldet data convert``: YOLO and VOC -> COCO, COCO -> YOLO; every problem named with file and line."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from focaldet.data.cli import main
from focaldet.data.convert import yolo_label_path, yolo_to_coco
from focaldet.errors import DataError


def test_coco_to_yolo_to_coco_gives_the_boxes_back(synth_coco, tmp_path, capsys):
    """The round trip through YOLO's normalised 6-decimal text: every box within 0.5 px (in
    fact 1e-3), same images, sizes and class names; category ids become 1..K in id order."""
    for split, ann in (("train", synth_coco.train_ann), ("val", synth_coco.val_ann)):
        assert main(["convert", str(ann), "--from", "coco", "--to", "yolo", "--images", str(synth_coco.images),
                     "--out", str(tmp_path / "yolo"), "--split", split]) == 0
    assert main(["convert", str(tmp_path / "yolo" / "data.yaml"), "--from", "yolo", "--out", str(tmp_path / "coco")]) == 0
    out = capsys.readouterr().out
    assert "instances_train.json" in out and "instances_val.json" in out
    for split, ann in (("train", synth_coco.train_ann), ("val", synth_coco.val_ann)):
        ref = json.loads(Path(ann).read_text())
        got = json.loads((tmp_path / "coco" / "annotations" / f"instances_{split}.json").read_text())
        ref_names = {c["id"]: c["name"] for c in ref["categories"]}
        assert [c["name"] for c in got["categories"]] == [ref_names[i] for i in sorted(ref_names)]
        assert [c["id"] for c in got["categories"]] == [1, 2, 3, 4]  # synth's ids are 1, 3, 7, 8
        got_names = {c["id"]: c["name"] for c in got["categories"]}
        assert len(got["images"]) == len(ref["images"])
        ref_by_file = {im["file_name"]: im for im in ref["images"]}
        worst, count = 0.0, 0
        for im in got["images"]:
            orig = ref_by_file[Path(im["file_name"]).name]
            assert (im["width"], im["height"]) == (orig["width"], orig["height"])
            want = sorted((ref_names[a["category_id"]], a["bbox"]) for a in ref["annotations"]
                          if a["image_id"] == orig["id"] and not a.get("iscrowd", 0))
            have = sorted((got_names[a["category_id"]], a["bbox"]) for a in got["annotations"] if a["image_id"] == im["id"])
            assert [n for n, _ in have] == [n for n, _ in want]
            for (_, a), (_, b) in zip(have, want):
                worst = max(worst, float(np.abs(np.array(a) - np.array(b)).max()))
                count += 1
        assert count > 10 and worst <= 0.5, worst
        assert worst < 1e-3  # 6 decimals of a 128 px image


def _yolo(tmp_path: Path, labels: dict[str, str], names=None) -> Path:
    """A YOLO dataset of 48x32 images ``images/train/<stem>.jpg`` with the given label files."""
    root = tmp_path / "ds"
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    for stem in ("a", "b", "c"):
        cv2.imwrite(str(root / "images" / "train" / f"{stem}.jpg"), np.zeros((32, 48, 3), np.uint8))
    for stem, text in labels.items():
        (root / "labels" / "train" / f"{stem}.txt").write_text(text)
    config = {"path": str(root), "train": "images/train", "names": names or {0: "cell", 1: "blob"}}
    (root / "data.yaml").write_text(yaml.safe_dump(config))
    return root / "data.yaml"


def test_yolo_boxes_background_images_and_polygons(tmp_path):
    data_yaml = _yolo(tmp_path, {"a": "1 0.5 0.5 0.25 0.5\n\n0 0.125 0.25 0.25 0.5\n",
                                 "b": "",  # empty file: background
                                 # "c": no label file: background
                                 }, names=["cell", "blob"])
    coco = yolo_to_coco(data_yaml, "train")
    assert [c["name"] for c in coco["categories"]] == ["cell", "blob"] and [c["id"] for c in coco["categories"]] == [1, 2]
    assert [im["file_name"] for im in coco["images"]] == ["images/train/a.jpg", "images/train/b.jpg", "images/train/c.jpg"]
    assert all((im["width"], im["height"]) == (48, 32) for im in coco["images"])
    boxes = [(a["image_id"], a["category_id"], a["bbox"]) for a in coco["annotations"]]
    assert boxes == [(1, 2, [18.0, 8.0, 12.0, 16.0]), (1, 1, [0.0, 0.0, 12.0, 16.0])]
    poly = _yolo(tmp_path / "p", {"a": "0 0.25 0.25 0.75 0.25 0.5 0.75\n"})
    assert yolo_to_coco(poly, "train")["annotations"][0]["bbox"] == [12.0, 8.0, 24.0, 16.0]
    assert yolo_label_path(Path("/d/images/x/images/train/a.png")) == Path("/d/images/x/labels/train/a.txt")


@pytest.mark.parametrize("line, message", [
    ("2 0.5 0.5 0.1 0.1", r"a\.txt line 2: class id 2 is past names \(2 classes"),
    ("0 0.5 1.5 0.1 0.1", r"a\.txt line 2: box .* is outside \[0, 1\]"),
    ("0 0.05 0.5 0.2 0.1", r"a\.txt line 2: box .* reaches outside the image"),
    ("0 0.5 0.5 0.1", r"a\.txt line 2: malformed line '0 0.5 0.5 0.1': 4 values"),
    ("x 0.5 0.5 0.1 0.1", r"a\.txt line 2: malformed line"),
    ("0.5 0.5 0.5 0.1 0.1", r"a\.txt line 2: class id '0.5' is not a non-negative integer"),
])
def test_every_problem_names_file_and_line(tmp_path, capsys, line, message):
    data_yaml = _yolo(tmp_path, {"a": f"0 0.5 0.5 0.2 0.2\n{line}\n"})
    with pytest.raises(DataError, match=message):
        yolo_to_coco(data_yaml, "train")
    assert main(["convert", str(data_yaml), "--from", "yolo", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("focaldet data convert: error: ") and "a.txt line 2" in err[0]


def test_bad_data_yaml_is_named(tmp_path):
    data_yaml = _yolo(tmp_path, {}, names={0: "a", 2: "b"})
    with pytest.raises(DataError, match=r"data\.yaml: names must have the class ids 0\.\.1"):
        yolo_to_coco(data_yaml, "train")
    with pytest.raises(DataError, match=r"no 'val' split"):
        yolo_to_coco(_yolo(tmp_path / "v", {}), "val")


def test_voc_folder_with_splits(tmp_path, capsys):
    ann = tmp_path / "VOC" / "Annotations"
    ann.mkdir(parents=True)
    sets = tmp_path / "VOC" / "ImageSets" / "Main"
    sets.mkdir(parents=True)
    obj = "<object><name>{}</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>20</ymax></bndbox></object>"
    for stem, name in (("001", "dog"), ("002", "cat")):
        (ann / f"{stem}.xml").write_text(f"<annotation><filename>{stem}.jpg</filename><size><width>50</width>"
                                         f"<height>40</height></size>{obj.format(name)}</annotation>")
    (sets / "train.txt").write_text("001\n")
    (sets / "val.txt").write_text("002\n")
    assert main(["convert", str(tmp_path / "VOC"), "--from", "voc", "--out", str(tmp_path / "out")]) == 0
    train = json.loads((tmp_path / "out" / "annotations" / "instances_train.json").read_text())
    val = json.loads((tmp_path / "out" / "annotations" / "instances_val.json").read_text())
    assert train["categories"] == val["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    assert train["annotations"][0]["bbox"] == [0.0, 0.0, 10.0, 20.0] and train["annotations"][0]["category_id"] == 2
    assert val["annotations"][0]["category_id"] == 1
    (sets / "test.txt").write_text("003\n")
    assert main(["convert", str(tmp_path / "VOC"), "--from", "voc", "--out", str(tmp_path / "o2")]) == 1
    assert "test.txt: 1 listed image(s) have no XML" in capsys.readouterr().err
