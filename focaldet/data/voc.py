"""Pascal VOC XML annotations -> COCO instances JSON.

Conventions (the same as detectron2's VOC loader):

- VOC pixel indices are 1-based and ``xmax``/``ymax`` are inclusive, so a box becomes
  ``x = xmin - 1, y = ymin - 1, w = xmax - xmin + 1, h = ymax - ymin + 1`` in COCO's
  0-based, exclusive-end pixels.
- ``difficult`` objects are kept as ordinary boxes (``iscrowd: 0``) and carry a
  ``"difficult": 1`` attribute (pycocotools ignores extra keys); pass
  ``include_difficult=False`` to leave them out.
- Categories get ids ``1..K`` in the order of ``labels`` when given (an object with another
  name is an error), else in sorted name order. Images get ids ``1..N`` in sorted XML file
  order; ``file_name`` is the XML's ``<filename>``.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from focaldet.errors import DataError

__all__ = ["convert_voc_to_coco", "voc_to_coco"]


def _text(node: ET.Element, tag: str, path: Path, default: str | None = None) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        if default is not None:
            return default
        raise DataError(f"{path}: missing <{tag}>")
    return child.text.strip()


def _number(node: ET.Element, tag: str, path: Path) -> float:
    text = _text(node, tag, path)
    try:
        return float(text)
    except ValueError:
        raise DataError(f"{path}: <{tag}> is not a number: {text!r}") from None


def _parse_xml(path: Path) -> dict[str, Any]:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        line, column = e.position
        raise DataError(f"{path}: malformed XML at line {line}, column {column + 1}") from None
    size = root.find("size")
    if size is None:
        raise DataError(f"{path}: missing <size>")
    objects = []
    for i, obj in enumerate(root.findall("object")):
        box = obj.find("bndbox")
        if box is None:
            raise DataError(f"{path}: object {i} has no <bndbox>")
        objects.append(
            {
                "name": _text(obj, "name", path),
                "difficult": int(_number(obj, "difficult", path)) if obj.find("difficult") is not None else 0,
                "box": [_number(box, tag, path) for tag in ("xmin", "ymin", "xmax", "ymax")],
            }
        )
    return {
        "file_name": _text(root, "filename", path, default=path.stem + ".jpg"),
        "width": int(_number(size, "width", path)),
        "height": int(_number(size, "height", path)),
        "objects": objects,
    }


def voc_to_coco(
    ann_dir: str | os.PathLike, labels: Sequence[str] | None = None, include_difficult: bool = True,
    files: Sequence[Path] | None = None,
) -> dict[str, Any]:
    """Convert every ``*.xml`` of ``ann_dir`` (sorted), or just ``files``, to a COCO instances dict."""
    ann_dir = Path(ann_dir)
    xml_files = sorted(ann_dir.glob("*.xml")) if files is None else list(files)
    if not xml_files:
        raise DataError(f"no *.xml annotation files in {ann_dir}")
    parsed = [(path, _parse_xml(path)) for path in xml_files]
    if labels is None:
        labels = sorted({obj["name"] for _, rec in parsed for obj in rec["objects"]})
    elif len(set(labels)) != len(labels):
        raise DataError(f"duplicate names in labels {list(labels)}")
    cat_id = {name: i + 1 for i, name in enumerate(labels)}

    images, annotations = [], []
    for image_id, (path, rec) in enumerate(parsed, start=1):
        images.append({"id": image_id, "file_name": rec["file_name"], "width": rec["width"], "height": rec["height"]})
        for obj in rec["objects"]:
            if obj["name"] not in cat_id:
                raise DataError(f"{path}: object class {obj['name']!r} is not one of the labels {list(labels)}")
            if obj["difficult"] and not include_difficult:
                continue
            xmin, ymin, xmax, ymax = obj["box"]
            w, h = xmax - xmin + 1, ymax - ymin + 1
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cat_id[obj["name"]],
                    "bbox": [xmin - 1, ymin - 1, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                    "difficult": obj["difficult"],
                }
            )
    categories = [{"id": i, "name": name} for name, i in cat_id.items()]
    return {"images": images, "annotations": annotations, "categories": categories}


def convert_voc_to_coco(
    ann_dir: str | os.PathLike,
    out_file: str | os.PathLike,
    labels: Sequence[str] | None = None,
    include_difficult: bool = True,
) -> dict[str, Any]:
    """`voc_to_coco` and write the result to ``out_file``; returns the dict."""
    data = voc_to_coco(ann_dir, labels, include_difficult)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(data))
    return data
