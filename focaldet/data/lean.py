"""Lean training annotations: a COCO instances JSON as a few flat numpy arrays, cached.

Training reads boxes, labels and crowd regions per image, nothing else; a pycocotools
``COCO`` of COCO train2017 holds ~2.6 GB of Python dicts (polygons included), which every
DataLoader worker then touches through reference counts (copy-on-write turns into copies).
Like detectron2's serialised dataset list, `LeanAnnotations` keeps one array per field
(images sorted by id, annotations grouped by image in file order) and `RecordTable` the
per-image training records as offsets into flat box arrays: a few dozen MB for 118k images
and 860k boxes, shared by forked workers without copies.

The JSON is parsed and validated once (`focaldet.data.coco.checked_coco_data`: the same
one-line errors and warnings as `load_coco`) and the arrays are cached in
``$FOCALDET_CACHE/annotations`` (see `focaldet.data.scan.cache_dir`), reused while the
file's path, size and modification time are unchanged; the validation's warnings are
cached with them and shown again. The evaluation ground truth (val/test) stays a ``COCO``.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from focaldet.atomic import atomic_write
from focaldet.data.validate import MIN_BOX_SIDE

__all__ = ["LeanAnnotations", "RecordTable", "load_lean"]

LEAN_VERSION = 1
_ARRAYS = ("image_ids", "heights", "widths", "file_names", "ann_offsets", "ann_ids", "ann_cats", "ann_boxes",
           "ann_crowd")


@dataclass
class LeanAnnotations:
    """A validated COCO instances file as arrays (N images, A annotations).

    ``image_ids (N,)`` sorted, ``heights/widths (N,)``, ``file_names (N,)`` str;
    annotations of image ``i`` are rows ``ann_offsets[i]:ann_offsets[i+1]`` (file order) of
    ``ann_ids (A,)``, ``ann_cats (A,)`` category ids, ``ann_boxes (A, 4)`` float64 COCO
    ``xywh`` and ``ann_crowd (A,)`` bool. ``categories``: ``[{"id", "name"}]``;
    ``warnings``: the validation's warning messages.
    """

    path: Path
    categories: list[dict[str, Any]]
    image_ids: np.ndarray
    heights: np.ndarray
    widths: np.ndarray
    file_names: np.ndarray
    ann_offsets: np.ndarray
    ann_ids: np.ndarray
    ann_cats: np.ndarray
    ann_boxes: np.ndarray
    ann_crowd: np.ndarray
    warnings: list[str]

    @classmethod
    def from_data(cls, path: Path, data: dict, messages: Sequence[str] = ()) -> LeanAnnotations:
        """From a validated COCO dict (``checked_coco_data``)."""
        images = sorted(data["images"], key=lambda img: img["id"])
        image_ids = np.fromiter((img["id"] for img in images), np.int64, len(images))
        anns = data.get("annotations", [])
        row = np.searchsorted(image_ids, np.fromiter((a["image_id"] for a in anns), np.int64, len(anns)))
        order = np.argsort(row, kind="stable")  # grouped by image, file order within
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        return cls(
            path=Path(path),
            categories=[{"id": int(c["id"]), "name": str(c["name"])} for c in data["categories"]],
            image_ids=image_ids,
            heights=np.fromiter((int(img["height"]) for img in images), np.int64, len(images)),
            widths=np.fromiter((int(img["width"]) for img in images), np.int64, len(images)),
            file_names=np.array([str(img["file_name"]) for img in images], dtype=str),
            ann_offsets=np.searchsorted(row[order], np.arange(len(images) + 1)).astype(np.int64),
            ann_ids=np.fromiter((a["id"] for a in anns), np.int64, len(anns))[order],
            ann_cats=np.fromiter((a["category_id"] for a in anns), np.int64, len(anns))[order],
            ann_boxes=boxes[order],
            ann_crowd=np.fromiter((bool(a.get("iscrowd", 0)) for a in anns), bool, len(anns))[order],
            warnings=list(messages),
        )

    def records(self, label_of_cat: np.ndarray, cat_ids: np.ndarray,
                filter_empty: bool = False) -> tuple[RecordTable, list[int], int]:
        """The training records of `focaldet.data.coco.CocoDetection`, vectorised:
        ``(table, ids of the degenerate annotations dropped, number of crowd regions kept)``.

        Boxes are clipped to the image (as ``clip_box``: float64, then float32) and dropped
        when at most ``MIN_BOX_SIDE`` wide or high; crowd regions become ``crowd_boxes``;
        ``label_of_cat[searchsorted(cat_ids, id)]`` maps category ids (sorted ``cat_ids``)
        to labels. ``filter_empty`` drops images without a trainable box.
        """
        counts = np.diff(self.ann_offsets)  # (N,) annotations per image
        w = np.repeat(self.widths, counts).astype(np.float64)  # (A,) the image size of each box
        h = np.repeat(self.heights, counts).astype(np.float64)
        x, y, bw, bh = self.ann_boxes.T  # (A,) each
        x1, y1 = np.minimum(np.maximum(x, 0.0), w), np.minimum(np.maximum(y, 0.0), h)
        x2, y2 = np.minimum(np.maximum(x + bw, 0.0), w), np.minimum(np.maximum(y + bh, 0.0), h)
        valid = ~((x2 - x1 <= MIN_BOX_SIDE) | (y2 - y1 <= MIN_BOX_SIDE))
        xyxy = np.stack([x1, y1, x2, y2], axis=1).astype(np.float32)  # (A, 4)
        image_row = np.repeat(np.arange(len(counts)), counts)  # (A,)
        plain, crowd = valid & ~self.ann_crowd, valid & self.ann_crowd
        labels = label_of_cat[np.searchsorted(cat_ids, self.ann_cats[plain])]
        box_offsets = np.r_[0, np.cumsum(np.bincount(image_row[plain], minlength=len(counts)))]
        crowd_offsets = np.r_[0, np.cumsum(np.bincount(image_row[crowd], minlength=len(counts)))]
        table = RecordTable(self.image_ids, self.file_names, self.heights, self.widths,
                            box_offsets.astype(np.int64), xyxy[plain], labels.astype(np.int64),
                            crowd_offsets.astype(np.int64), xyxy[crowd])
        if filter_empty:
            table = table.take(np.flatnonzero(np.diff(box_offsets) > 0))
        return table, self.ann_ids[~valid].tolist(), int(crowd.sum())


class RecordTable(Sequence):
    """Per-image training records in flat arrays; ``table[i]`` is the record dict
    ``{"image_id", "file_name", "height", "width", "boxes" (G, 4) float32 xyxy,
    "labels" (G,) int64, "crowd_boxes" (C, 4) float32}`` (views into the flat arrays)."""

    def __init__(self, image_ids, file_names, heights, widths, box_offsets, boxes, labels, crowd_offsets,
                 crowd_boxes) -> None:
        self.image_ids, self.file_names, self.heights, self.widths = image_ids, file_names, heights, widths
        self.box_offsets, self.boxes, self.labels = box_offsets, boxes, labels
        self.crowd_offsets, self.crowd_boxes = crowd_offsets, crowd_boxes

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} of {len(self)}")
        b0, b1 = self.box_offsets[i], self.box_offsets[i + 1]
        c0, c1 = self.crowd_offsets[i], self.crowd_offsets[i + 1]
        return {"image_id": int(self.image_ids[i]), "file_name": str(self.file_names[i]),
                "height": int(self.heights[i]), "width": int(self.widths[i]),
                "boxes": self.boxes[b0:b1], "labels": self.labels[b0:b1], "crowd_boxes": self.crowd_boxes[c0:c1]}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))

    def num_boxes(self) -> int:
        return int(len(self.boxes))

    def take(self, rows: np.ndarray) -> RecordTable:
        """The records ``rows`` (ascending indices), in a new table."""
        rows = np.asarray(rows, dtype=np.int64)
        nb, nc = np.diff(self.box_offsets)[rows], np.diff(self.crowd_offsets)[rows]
        box_idx = _ranges(self.box_offsets[rows], nb)
        crowd_idx = _ranges(self.crowd_offsets[rows], nc)
        return RecordTable(self.image_ids[rows], self.file_names[rows], self.heights[rows], self.widths[rows],
                           np.r_[0, np.cumsum(nb)].astype(np.int64), self.boxes[box_idx], self.labels[box_idx],
                           np.r_[0, np.cumsum(nc)].astype(np.int64), self.crowd_boxes[crowd_idx])


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(s, s + n)`` for each pair, vectorised."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offsets = np.r_[0, np.cumsum(lengths)[:-1]]
    return np.repeat(starts - offsets, lengths) + np.arange(total)


# --------------------------------------------------------------------------------------
# Loading with a cache
# --------------------------------------------------------------------------------------


def _cache_file(path: Path) -> Path:
    from focaldet.data.scan import cache_dir

    digest = hashlib.sha1(str(path).encode()).hexdigest()[:16]
    return cache_dir() / "annotations" / f"{path.stem}-{digest}.npz"


def _key(path: Path) -> str:
    st = os.stat(path)
    return json.dumps([LEAN_VERSION, str(path), st.st_size, st.st_mtime_ns])


def load_lean(path: str | os.PathLike, cache: bool = True) -> LeanAnnotations:
    """`LeanAnnotations` of a COCO instances JSON: from the cache when the file is unchanged,
    else parsed and validated (raising `DataError` as `load_coco` does) and cached."""
    from focaldet.data.coco import DataWarning, checked_coco_data, read_coco_json

    path = Path(path).resolve()
    if not path.is_file():
        read_coco_json(path)  # raises the loader's "annotation file not found"
    key = _key(path)
    if cache:
        lean = _read_cache(path, key)
        if lean is not None:
            for message in lean.warnings:
                warnings.warn(message, DataWarning, stacklevel=2)
            return lean
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = checked_coco_data(path)
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    lean = LeanAnnotations.from_data(path, data, messages)
    del data
    gc.collect()
    _trim_heap()
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if cache:
        _write_cache(path, key, lean)
    return lean


def _trim_heap() -> None:
    """Give the freed JSON's memory back to the OS (glibc keeps it otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def _read_cache(path: Path, key: str) -> LeanAnnotations | None:
    try:
        with np.load(_cache_file(path), allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta["key"] != key:
                return None
            arrays = {name: z[name] for name in _ARRAYS}
        return LeanAnnotations(path=path, categories=meta["categories"], warnings=meta["warnings"], **arrays)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no cache, or one we cannot use: parse again


def _write_cache(path: Path, key: str, lean: LeanAnnotations) -> None:
    """Write atomically; a cache that cannot be written is skipped."""
    target = _cache_file(path)
    meta = json.dumps({"key": key, "categories": lean.categories, "warnings": lean.warnings})
    try:
        with atomic_write(target, "wb") as f:
            np.savez(f, meta=np.array(meta), **{name: getattr(lean, name) for name in _ARRAYS})
    except OSError:
        pass
