"""Datasets in other formats -> COCO instances JSON (``focaldet data convert``), and COCO -> YOLO.

**YOLO** (ultralytics' layout): a ``data.yaml`` with ``names`` (a list, or a mapping
``{0: name, ...}``), an optional root ``path`` (default: the YAML's folder) and the splits
``train``/``val``/``test``, each an image folder, a ``.txt`` list of images, or a list of
those, relative to the root. An image's labels are the ``.txt`` of the same stem in the
folder that has ``labels`` where the image path has its last ``images`` (ultralytics'
``img2label_paths``); one object per line, ``class cx cy w h`` normalised to [0, 1] (a
polygon ``class x1 y1 x2 y2 ...`` becomes its bounding box). An image without a label file,
or with an empty one, is a background image (kept, no boxes). Class id ``i`` becomes COCO
category ``i + 1`` with ``names[i]``. Boxes are ``bbox = [(cx - w/2) W, (cy - h/2) H, w W, h H]``
in the decoded image's pixels (EXIF orientation applied, as ultralytics' ``exif_size``).
Every problem (a class id past ``names``, a coordinate outside [0, 1], a malformed line, an
unreadable image) is a `DataError` naming the file and line.

**VOC**: ``focaldet.data.voc`` (``Annotations/*.xml``; splits from ``ImageSets/Main/<split>.txt``).

The COCO ``file_name`` is the image's path relative to the dataset root, so
``--data.train_images ROOT`` finds it; nothing is copied.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from focaldet.errors import DataError

__all__ = ["coco_to_yolo", "read_yolo_names", "voc_dataset_to_coco", "yolo_label_path", "yolo_to_coco"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val", "test")
_EDGE_TOLERANCE = 1e-3  # normalised: a box edge this far past the border is clipped, further is an error


def read_yolo_names(data_yaml: Path, config: dict) -> list[str]:
    names = config.get("names")
    if isinstance(names, dict):
        try:
            ids = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            raise DataError(f"{data_yaml}: names must map class ids 0..K-1 to names, got keys {list(names)}") from None
        if ids != list(range(len(ids))):
            raise DataError(f"{data_yaml}: names must have the class ids 0..{len(ids) - 1}, got {ids}")
        names = [names[k] if k in names else names[str(k)] for k in ids]
    if not isinstance(names, list) or not names:
        raise DataError(f"{data_yaml}: no 'names' list of class names")
    names = [str(n) for n in names]
    if len(set(names)) != len(names):
        raise DataError(f"{data_yaml}: duplicate class names in {names}")
    return names


def yolo_label_path(image: Path) -> Path:
    """ultralytics' ``img2label_paths``: the last ``images`` folder of the path -> ``labels``, suffix ``.txt``."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _split_images(root: Path, entry: Any, data_yaml: Path, split: str) -> list[Path]:
    images: list[Path] = []
    for item in entry if isinstance(entry, list) else [entry]:
        p = Path(str(item)).expanduser()
        p = p if p.is_absolute() else root / p
        if p.is_dir():
            images += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file() and p.suffix == ".txt":
            for line in p.read_text().splitlines():
                if line.strip():
                    f = Path(line.strip())
                    images.append(f if f.is_absolute() else (p.parent / f).resolve() if line.startswith(".")
                                  else root / f)
        else:
            raise DataError(f"{data_yaml}: {split}: {p} is neither an image folder nor a .txt list of images")
    return images


def _parse_label_line(line: str, where: str, num_classes: int, names: Sequence[str]) -> tuple[int, list[float]]:
    """``class cx cy w h`` (or a polygon) -> (class id, normalised [x0, y0, x1, y1])."""
    fields = line.split()
    try:
        cls_f = float(fields[0])
        values = [float(v) for v in fields[1:]]
    except ValueError:
        raise DataError(f"{where}: malformed line {line.strip()!r} (expected 'class cx cy w h', numbers)") from None
    if cls_f != int(cls_f) or cls_f < 0:
        raise DataError(f"{where}: class id {fields[0]!r} is not a non-negative integer")
    cls = int(cls_f)
    if cls >= num_classes:
        raise DataError(f"{where}: class id {cls} is past names ({num_classes} classes: {list(names)})")
    if len(values) == 4:
        cx, cy, w, h = values
        if not all(0 <= v <= 1 for v in values):
            raise DataError(f"{where}: box {values} is outside [0, 1] (YOLO coordinates are normalised)")
        box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    elif len(values) >= 6 and len(values) % 2 == 0:  # a segment: its bounding box
        if not all(0 <= v <= 1 for v in values):
            raise DataError(f"{where}: polygon point outside [0, 1] (YOLO coordinates are normalised)")
        xs, ys = values[0::2], values[1::2]
        box = [min(xs), min(ys), max(xs), max(ys)]
    else:
        raise DataError(f"{where}: malformed line {line.strip()!r}: {len(fields)} values "
                        "(expected 'class cx cy w h' or 'class x1 y1 x2 y2 x3 y3 ...')")
    if min(box) < -_EDGE_TOLERANCE or max(box) > 1 + _EDGE_TOLERANCE:
        raise DataError(f"{where}: box {values} reaches outside the image (edges {[round(b, 4) for b in box]})")
    return cls, [min(max(b, 0.0), 1.0) for b in box]


def yolo_to_coco(data_yaml: str | os.PathLike, split: str) -> dict[str, Any]:
    """One split of a YOLO dataset as a COCO instances dict (see the module docstring)."""
    from focaldet.data.images import read_header
    from focaldet.config.recipe import read_config_file

    data_yaml = Path(data_yaml)
    config = read_config_file(data_yaml)
    names = read_yolo_names(data_yaml, config)
    root = Path(str(config.get("path") or data_yaml.parent)).expanduser()
    root = root if root.is_absolute() else data_yaml.parent / root
    if not config.get(split):
        raise DataError(f"{data_yaml}: no {split!r} split")
    images_out, annotations = [], []
    for image_path in _split_images(root, config[split], data_yaml, split):
        header = read_header(image_path) if image_path.is_file() else None
        if header is None:
            raise DataError(f"{image_path}: not found or not a readable image")
        h, w = header.size
        image_id = len(images_out) + 1
        try:
            file_name = image_path.relative_to(root).as_posix()
        except ValueError:
            file_name = image_path.as_posix()
        images_out.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
        label_file = yolo_label_path(image_path)
        if not label_file.is_file():
            continue  # a background image
        for number, line in enumerate(label_file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            cls, (x0, y0, x1, y1) = _parse_label_line(line, f"{label_file} line {number}", len(names), names)
            bw, bh = (x1 - x0) * w, (y1 - y0) * h
            if bw <= 0 or bh <= 0:
                raise DataError(f"{label_file} line {number}: box of zero width or height")
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cls + 1,
                                "bbox": [x0 * w, y0 * h, bw, bh], "area": bw * bh, "iscrowd": 0})
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(names)]
    return {"images": images_out, "annotations": annotations, "categories": categories}


def voc_dataset_to_coco(data: str | os.PathLike, labels: Sequence[str] | None = None,
                        include_difficult: bool = True) -> dict[str, dict[str, Any]]:
    """``{split: COCO dict}`` of a VOC folder: ``DATA/Annotations`` (or ``DATA`` itself when it
    holds the XML files), one split per ``DATA/ImageSets/Main/<split>.txt`` (``all`` without
    them); the categories are the same in every split."""
    from focaldet.data.voc import voc_to_coco

    data = Path(data)
    ann_dir = data / "Annotations" if (data / "Annotations").is_dir() else data
    xml_files = sorted(ann_dir.glob("*.xml"))
    if not xml_files:
        raise DataError(f"no *.xml annotation files in {ann_dir}")
    if labels is None:  # one category list for every split
        labels = sorted(voc_to_coco(ann_dir)["categories"], key=lambda c: c["id"])
        labels = [c["name"] for c in labels]
    sets = data / "ImageSets" / "Main"
    splits = {s: sets / f"{s}.txt" for s in (*SPLITS, "trainval") if (sets / f"{s}.txt").is_file()}
    if not splits:
        return {"all": voc_to_coco(ann_dir, labels, include_difficult)}
    out = {}
    for split, listing in splits.items():
        stems = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
        missing = [s for s in stems if not (ann_dir / f"{s}.xml").is_file()]
        if missing:
            raise DataError(f"{listing}: {len(missing)} listed image(s) have no XML in {ann_dir}, e.g. {missing[0]}")
        out[split] = voc_to_coco(ann_dir, labels, include_difficult, files=[ann_dir / f"{s}.xml" for s in stems])
    return out


def coco_to_yolo(ann_file: str | os.PathLike, images: str | os.PathLike, out: str | os.PathLike,
                 split: str = "train") -> Path:
    """Write a COCO split as YOLO: ``OUT/labels/SPLIT/<stem>.txt`` (``class cx cy w h``, 6
    decimals), ``OUT/images/SPLIT/<file>`` as symbolic links to the images (nothing copied)
    and ``OUT/data.yaml`` (``names`` in category-id order; merged with the splits already
    there). Crowd boxes are left out. Returns the data.yaml path."""
    import yaml

    ann_file, images, out = Path(ann_file), Path(images), Path(out)
    try:
        data = json.loads(ann_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{ann_file}: not a readable COCO JSON ({e})") from None
    cats = sorted(data.get("categories", []), key=lambda c: c["id"])
    index = {c["id"]: i for i, c in enumerate(cats)}
    by_image: dict[int, list[dict]] = {}
    for a in data.get("annotations", []):
        by_image.setdefault(a["image_id"], []).append(a)
    for im in data["images"]:
        name = Path(im["file_name"])
        stem = name.with_suffix("").as_posix().replace("/", "__")
        link = out / "images" / split / f"{stem}{name.suffix}"
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to((images / name).resolve())
        label = out / "labels" / split / f"{stem}.txt"
        label.parent.mkdir(parents=True, exist_ok=True)
        w, h = im["width"], im["height"]
        lines = []
        for a in by_image.get(im["id"], []):
            if a.get("iscrowd", 0):
                continue
            x, y, bw, bh = a["bbox"]
            lines.append(f"{index[a['category_id']]} {(x + bw / 2) / w:.6f} {(y + bh / 2) / h:.6f} "
                         f"{bw / w:.6f} {bh / h:.6f}")
        label.write_text("".join(line + "\n" for line in lines))
    yaml_path = out / "data.yaml"
    config = yaml.safe_load(yaml_path.read_text()) if yaml_path.is_file() else {}
    config.update({"path": ".", split: f"images/{split}", "names": {i: c["name"] for i, c in enumerate(cats)}})
    yaml_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return yaml_path


def write_coco(data: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path
