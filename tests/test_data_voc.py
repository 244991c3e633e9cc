"""Pascal VOC XML -> COCO JSON conversion."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from pycocotools.coco import COCO

from focaldet.data import voc_to_coco
from focaldet.data.cli import main
from focaldet.errors import DataError


def _xml(filename, objects, width=500, height=375):
    objs = "".join(
        f"<object><name>{name}</name><difficult>{difficult}</difficult>"
        f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        for name, (x1, y1, x2, y2), difficult in objects
    )
    return (
        f"<annotation><filename>{filename}</filename>"
        f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>{objs}</annotation>"
    )


@pytest.fixture
def voc_dir(tmp_path):
    ann = tmp_path / "Annotations"
    ann.mkdir()
    (ann / "000002.xml").write_text(_xml("000002.jpg", [("dog", (1, 1, 100, 50), 0), ("cat", (10, 20, 30, 40), 1)]))
    (ann / "000001.xml").write_text(_xml("000001.jpg", [("person", (48, 240, 195, 371), 0)]))
    return ann


def test_conversion_conventions(voc_dir):
    data = voc_to_coco(voc_dir)
    assert [c["name"] for c in data["categories"]] == ["cat", "dog", "person"]
    assert [c["id"] for c in data["categories"]] == [1, 2, 3]
    assert [(i["id"], i["file_name"], i["width"], i["height"]) for i in data["images"]] == [
        (1, "000001.jpg", 500, 375),
        (2, "000002.jpg", 500, 375),
    ]
    person, dog, cat = data["annotations"]
    # 1-based inclusive VOC pixels -> 0-based COCO: x = xmin - 1, w = xmax - xmin + 1
    assert person["bbox"] == [47, 239, 148, 132] and person["image_id"] == 1 and person["category_id"] == 3
    assert dog["bbox"] == [0, 0, 100, 50] and dog["area"] == 5000
    assert cat["difficult"] == 1 and cat["iscrowd"] == 0
    assert [a["id"] for a in data["annotations"]] == [1, 2, 3]


def test_labels_fix_order_and_difficult_can_be_skipped(voc_dir):
    data = voc_to_coco(voc_dir, labels=["person", "dog", "cat", "bird"], include_difficult=False)
    assert [(c["id"], c["name"]) for c in data["categories"]] == [(1, "person"), (2, "dog"), (3, "cat"), (4, "bird")]
    assert [a["category_id"] for a in data["annotations"]] == [1, 2]


def test_errors(voc_dir, tmp_path):
    with pytest.raises(DataError, match=r"000002\.xml: object class 'cat' is not one of the labels"):
        voc_to_coco(voc_dir, labels=["dog", "person"])
    (voc_dir / "000003.xml").write_text("<annotation><filename>x.jpg</filename>\n<size></annotation>")
    with pytest.raises(DataError, match=r"000003\.xml: malformed XML at line 2, column \d+"):
        voc_to_coco(voc_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no \\*.xml annotation files"):
        voc_to_coco(tmp_path / "empty")


def test_cli_writes_loadable_coco(voc_dir, tmp_path, capsys):
    out = tmp_path / "out" / "instances.json"
    assert main(["voc2coco", "--ann-dir", str(voc_dir), "--out", str(out), "--labels", "person,dog,cat"]) == 0
    assert "2 images, 3 boxes, 3 categories (person, dog, cat)" in capsys.readouterr().out
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(out))
    assert len(coco.getAnnIds()) == 3 and json.loads(out.read_text())["categories"][0]["name"] == "person"

    assert main(["voc2coco", "--ann-dir", str(voc_dir), "--out", str(out), "--labels", "dog"]) == 1
    assert "error: " in capsys.readouterr().err
