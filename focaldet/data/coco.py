"""COCO-format detection data: JSON loading with readable errors, label maps, datasets.

Inside focaldet boxes are float ``xyxy`` pixels and labels are contiguous ``0..K-1``; the
COCO ``xywh`` boxes and arbitrary category ids only exist in the JSON files. `LabelMap`
converts between category ids and labels in both directions and is stored in checkpoints.

A dataset sample is a dict::

    image      (3, H, W) uint8 tensor, RGB, after transforms (the model normalises);
               a view of the decoded (H, W, 3) array
    boxes      (G, 4) float32 xyxy, in pixels of the transformed image
    labels     (G,) int64 contiguous labels
    crowd_boxes (C, 4) float32 xyxy ``iscrowd`` regions, transformed with the boxes
               (no labels: training ignores the background anchors inside them)
    image_id   int, the COCO image id (running index for an image folder)
    orig_size  (h, w) ints of the image file
    size       (h, w) ints after transforms
    file_name  str, as in the JSON
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset

from focaldet.data.images import (
    IMAGE_EXTENSIONS,
    MAX_PIXELS,
    ImageError,
    image_from_bytes,
    list_images,
    read_bytes,
    read_header,
    read_image,
)
from focaldet.data.transforms import decode_reduction, leading_resize, reduction_for_resize
from focaldet.data.validate import MIN_BOX_SIDE, clip_box, validate_coco
from focaldet.errors import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "CocoDetection",
    "DataWarning",
    "ImageError",
    "ImageFolderDataset",
    "LabelMap",
    "load_coco",
    "read_coco_json",
    "read_image",
    "subset_coco",
]

class DataWarning(UserWarning):
    """Dataset content that focaldet works around (e.g. degenerate boxes it drops)."""


# --------------------------------------------------------------------------------------
# Label map
# --------------------------------------------------------------------------------------


class LabelMap:
    """Bijection between COCO category ids (arbitrary, sorted ascending) and labels ``0..K-1``.

    Args:
        cat_ids: category ids; label ``i`` is the ``i``-th smallest id.
        names: category names, in the same order as ``cat_ids``.
    """

    def __init__(self, cat_ids: Sequence[int], names: Sequence[str]) -> None:
        if len(cat_ids) != len(names):
            raise DataError(f"label map has {len(cat_ids)} category ids but {len(names)} names")
        if len(set(cat_ids)) != len(cat_ids):
            raise DataError(f"label map has duplicate category ids: {list(cat_ids)}")
        order = sorted(range(len(cat_ids)), key=lambda i: cat_ids[i])
        self.cat_ids: list[int] = [int(cat_ids[i]) for i in order]
        self.names: list[str] = [str(names[i]) for i in order]
        self._label_of = {c: i for i, c in enumerate(self.cat_ids)}

    @classmethod
    def from_categories(cls, categories: Sequence[Mapping[str, Any]]) -> LabelMap:
        """From a COCO ``categories`` list of ``{"id": ..., "name": ...}``."""
        return cls([c["id"] for c in categories], [c.get("name", str(c["id"])) for c in categories])

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> LabelMap:
        """Inverse of `to_dict`."""
        try:
            return cls(list(state["cat_ids"]), list(state["names"]))
        except (KeyError, TypeError) as e:
            raise DataError(f"invalid label map {state!r}: expected keys 'cat_ids' and 'names'") from e

    def to_dict(self) -> dict[str, list]:
        """Plain lists, safe to store in a checkpoint or YAML: ``{"cat_ids": [...], "names": [...]}``."""
        return {"cat_ids": list(self.cat_ids), "names": list(self.names)}

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def __len__(self) -> int:
        return len(self.cat_ids)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelMap) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        pairs = ", ".join(f"{c}:{n!r}" for c, n in zip(self.cat_ids, self.names))
        return f"LabelMap({pairs})"

    def __contains__(self, cat_id: object) -> bool:
        return cat_id in self._label_of

    def to_label(self, cat_id: int) -> int:
        """Contiguous label of a category id; `DataError` for an unknown id."""
        try:
            return self._label_of[int(cat_id)]
        except KeyError:
            raise DataError(f"category id {cat_id} is not one of {self.cat_ids}") from None

    def to_cat_id(self, labels: Tensor) -> Tensor:
        """Labels ``(...)`` int in ``0..K-1`` -> category ids ``(...)`` int64 on the same device."""
        labels = labels.long()
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise DataError(f"labels must lie in 0..{self.num_classes - 1}, got {labels.min()}..{labels.max()}")
        table = torch.tensor(self.cat_ids, dtype=torch.int64, device=labels.device)
        return table[labels]


# --------------------------------------------------------------------------------------
# JSON loading
# --------------------------------------------------------------------------------------


def read_coco_json(path: str | os.PathLike) -> dict:
    """Parse a JSON file; `DataError` naming file, line and column on bad syntax (its content
    is checked by `focaldet.data.validate.validate_coco`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read annotation file: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    return data


def load_coco(path: str | os.PathLike) -> COCO:
    """Parse, validate and index a COCO JSON into a pycocotools ``COCO`` (without its prints).

    Raises one `DataError` naming the file and listing every error `validate_coco` finds
    (malformed JSON with line and column, invalid or duplicate ids, image entries without
    a valid size, annotations pointing at a missing image or an unknown category, invalid
    bboxes). Warns (`DataWarning`) when many boxes run past the image border. Missing
    ``iscrowd`` / ``area`` / category ``name`` are filled in (0, the bbox area, the id), as the
    evaluator needs them.
    """
    return _index(checked_coco_data(path))


def checked_coco_data(path: str | os.PathLike, stacklevel: int = 3) -> dict:
    """The parsed and validated JSON of `load_coco` (its errors, warning and filled-in
    keys), before any index is built: the one home of those rules for `load_coco` and the
    lean training annotations (`focaldet.data.lean`)."""
    path = Path(path)
    data = read_coco_json(path)
    checked = validate_coco(data)
    errors = checked.problems.errors
    if errors:
        raise DataError(f"{path}: {' | '.join(errors)}")
    xyxy = checked.problems.message("xyxy")
    if xyxy is not None:
        warnings.warn(f"{path}: {xyxy}", DataWarning, stacklevel=stacklevel)
    data.setdefault("annotations", [])
    for ann in data["annotations"]:
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))
    for cat in data["categories"]:
        cat.setdefault("name", str(cat["id"]))
    return data


def _index(data: dict) -> COCO:
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def subset_coco(coco: COCO, image_ids: Collection[int]) -> COCO:
    """A ``COCO`` with only the images ``image_ids`` and their annotations (e.g. the
    ground truth without the images a data module skipped)."""
    keep = set(image_ids)
    data = dict(coco.dataset)
    data["images"] = [img for img in data["images"] if img["id"] in keep]
    data["annotations"] = [ann for ann in data.get("annotations", []) if ann["image_id"] in keep]
    return _index(data)


# --------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------


def _decoded_from(image: np.ndarray, reduce: int, height: int, width: int) -> bool:
    """Whether ``image``, decoded at ``1/reduce``, is an image of ``height x width``
    (``ceil(height / reduce)`` rows; exact when ``reduce == 1``)."""
    h, w = image.shape[:2]
    return abs(h * reduce - height) < reduce and abs(w * reduce - width) < reduce


CROWD = -1  # the label a crowd region travels under through the transforms (real labels are >= 0)


def _apply_transforms(
    transforms: Callable | None, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray,
    crowd_boxes: np.ndarray | None = None,
) -> dict[str, Any]:
    """Run an albumentations-style callable and pack the result as tensors.

    Crowd regions ``(C, 4)`` ride along as extra boxes labelled `CROWD`, so every geometric
    transform (resize, flip, crop, affine) moves them exactly as the boxes, and one that
    leaves the image (or a crop that removes it) disappears; they are split off again after.
    """
    crowd = np.zeros((0, 4), dtype=np.float32) if crowd_boxes is None else crowd_boxes.reshape(-1, 4)
    if transforms is not None:
        if len(crowd):  # without crowd regions the call is exactly the plain one
            boxes = np.concatenate([np.asarray(boxes, dtype=np.float32).reshape(-1, 4), crowd])
            labels = np.concatenate([np.asarray(labels, dtype=np.int64).reshape(-1),
                                     np.full(len(crowd), CROWD, dtype=np.int64)])
        out = transforms(image=image, bboxes=boxes, labels=labels)
        image = out["image"]
        boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
        # Transforms may leave slivers; a box must keep a positive extent to be learnable.
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, labels = boxes[keep], labels[keep]
        is_crowd = labels == CROWD
        crowd, boxes, labels = boxes[is_crowd], boxes[~is_crowd], labels[~is_crowd]
    h, w = image.shape[:2]
    return {
        # (H, W, 3) -> (3, H, W) view, no copy: the collate copies it once, into the batch
        "image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1),
        "boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.as_tensor(labels, dtype=torch.int64).reshape(-1),
        "crowd_boxes": torch.as_tensor(crowd, dtype=torch.float32).reshape(-1, 4),
        "size": (int(h), int(w)),
    }


# --------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------


class CocoDetection(Dataset):
    """Detection dataset over a COCO instances JSON and an image folder.

    Boxes are converted to ``xyxy`` and clipped to the image size given in the JSON;
    boxes narrower or lower than 1 px after clipping are dropped and counted (one
    `DataWarning` per dataset). ``iscrowd=1`` annotations are not objects to learn: they
    become the sample's ``crowd_boxes`` (clipped and dropped alike, no label), regions whose
    background anchors the criterion ignores; ``num_crowd`` counts the kept ones. They do not
    make an image non-empty for ``filter_empty``. Images without boxes are kept unless
    ``filter_empty``.

    Args:
        ann_file: COCO instances JSON.
        image_dir: folder the JSON ``file_name`` entries are relative to.
        transforms: albumentations-style callable ``f(image=, bboxes=, labels=) -> dict``
            (see `focaldet.data.transforms.build_transforms`); ``None`` keeps the image as is.
        filter_empty: drop images that have no trainable box (as detectron2 does in training).
        coco: an already parsed ``COCO`` of ``ann_file`` (e.g. the datamodule's cached one).
        lean: instead of ``coco``, the `focaldet.data.lean.LeanAnnotations` of ``ann_file``
            (what the data module trains on): the records are then a
            `focaldet.data.lean.RecordTable` of flat arrays and ``coco`` is ``None``.
        label_map: expected label map (e.g. from a checkpoint); must have the JSON's category ids.
        resize_after: ``(min_size, max_size)`` of a `ResizeShortestEdge` that runs after this
            dataset (an exported graph's): images are then decoded as small as that resize
            allows, as the eval pipeline decodes them (`decode_reduction`).

    Samples are dicts, see the module docstring.
    """

    def __init__(
        self,
        ann_file: str | os.PathLike,
        image_dir: str | os.PathLike,
        transforms: Callable | None = None,
        filter_empty: bool = False,
        coco: COCO | None = None,
        label_map: LabelMap | None = None,
        lean: Any = None,
        resize_after: tuple[int, int] | None = None,
    ) -> None:
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        self.transforms = transforms
        self.resize_after = resize_after
        self.coco = None if lean is not None else coco if coco is not None else load_coco(self.ann_file)
        json_map = LabelMap.from_categories(lean.categories if lean is not None else self.coco.dataset["categories"])
        if label_map is not None and label_map.cat_ids != json_map.cat_ids:
            raise DataError(
                f"{self.ann_file}: category ids {json_map.cat_ids} differ from the label map's {label_map.cat_ids}"
            )
        self.label_map = label_map or json_map
        self.num_crowd = 0
        self.num_degenerate = 0
        degenerate_ids: list = []

        self.records: Sequence[dict[str, Any]] = []
        if lean is not None:
            cat_ids = np.asarray(self.label_map.cat_ids, dtype=np.int64)
            self.records, degenerate_ids, self.num_crowd = lean.records(np.arange(len(cat_ids)), cat_ids, filter_empty)
            self.num_degenerate = len(degenerate_ids)
        for image_id in sorted(self.coco.imgs) if self.coco is not None else ():
            img = self.coco.imgs[image_id]
            height, width = int(img["height"]), int(img["width"])
            boxes, labels, crowd = [], [], []
            for ann in self.coco.imgToAnns.get(image_id, []):
                box = clip_box(ann["bbox"], width, height)
                if box is None:
                    self.num_degenerate += 1
                    degenerate_ids.append(ann["id"])
                elif ann.get("iscrowd", 0):
                    crowd.append(box)
                else:
                    boxes.append(box)
                    labels.append(self.label_map.to_label(ann["category_id"]))
            self.num_crowd += len(crowd)
            if filter_empty and not boxes:
                continue
            self.records.append(
                {
                    "image_id": image_id,
                    "file_name": str(img["file_name"]),
                    "height": height,
                    "width": width,
                    "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                    "labels": np.asarray(labels, dtype=np.int64),
                    "crowd_boxes": np.asarray(crowd, dtype=np.float32).reshape(-1, 4),
                }
            )
        if degenerate_ids:
            shown = ", ".join(str(i) for i in degenerate_ids[:10]) + (", ..." if len(degenerate_ids) > 10 else "")
            warnings.warn(
                f"{self.ann_file}: dropped {len(degenerate_ids)} degenerate box(es) with width or height "
                f"<= {MIN_BOX_SIDE:g} px after clipping to the image (annotation ids {shown})",
                DataWarning,
                stacklevel=2,
            )

    @property
    def image_ids(self) -> list[int]:
        """COCO image ids, in dataset order."""
        image_ids = getattr(self.records, "image_ids", None)  # a lean RecordTable's column
        if image_ids is not None:
            return image_ids.tolist()
        return [r["image_id"] for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.records[index]
        image, scale = self._read(rec)
        boxes, crowd = rec["boxes"], rec["crowd_boxes"]
        if scale is not None:
            boxes, crowd = boxes * scale, crowd * scale
        sample = _apply_transforms(self.transforms, image, boxes, rec["labels"], crowd)
        sample.update(
            image_id=int(rec["image_id"]),
            orig_size=(rec["height"], rec["width"]),
            file_name=rec["file_name"],
        )
        return sample

    def _read(self, rec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
        """The record's image, decoded as small as the transforms allow (`decode_reduction`),
        and the ``(4,)`` factor that scales its boxes to the decoded image (``None``: 1)."""
        path, height, width = self.image_dir / rec["file_name"], rec["height"], rec["width"]
        if self.resize_after is not None:
            reduce = reduction_for_resize(height, width, *self.resize_after)
        else:
            reduce = decode_reduction(self.transforms, height, width)
        image = read_image(path, rec["image_id"], reduce)
        h, w = image.shape[:2]
        if not _decoded_from(image, reduce, height, width):
            if reduce > 1:  # name the size on disk, not the reduced one
                h, w = read_image(path, rec["image_id"]).shape[:2]
            raise ImageError(f"image {path} (image id {rec['image_id']}) is {w}x{h} (w x h) on disk "
                             f"but {width}x{height} in {self.ann_file}")
        if reduce == 1:
            return image, None
        return image, np.array([w / width, h / height] * 2, dtype=np.float32)


class ImageFolderDataset(Dataset):
    """Unlabelled images of a folder (sorted by name), for prediction.

    Samples have the same keys as `CocoDetection`, with empty ``boxes (0, 4)`` and
    ``labels (0,)``, ``image_id`` the running index and ``file_name`` relative to the folder.
    Like `CocoDetection`, a JPEG at least twice the size the transforms' leading resize
    brings it to is decoded smaller (`decode_reduction`); its size is then read from the
    file's header, so ``orig_size`` is always the size of the full image.
    """

    def __init__(self, image_dir: str | os.PathLike, transforms: Callable | None = None) -> None:
        self.image_dir = Path(image_dir)
        self.transforms = transforms
        self.files = [p.relative_to(self.image_dir).as_posix() for p in list_images(self.image_dir)]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, (h, w) = self._read(self.image_dir / self.files[index], index)
        sample = _apply_transforms(
            self.transforms, image, np.zeros((0, 4), dtype=np.float32), np.zeros((0,), dtype=np.int64)
        )
        sample.update(image_id=index, orig_size=(int(h), int(w)), file_name=self.files[index])
        return sample

    def _read(self, path: Path, index: int) -> tuple[np.ndarray, tuple[int, int]]:
        """The image, decoded as small as the transforms allow, and the full image's ``(h, w)``."""
        what = f"image {path} (image id {index})"
        return decode_for_pipeline(read_bytes(path, what), what, pipeline_reduction(self.transforms))


def pipeline_reduction(transforms: Any) -> Callable[[int, int], int] | None:
    """``(h, w) -> decode reduction`` of an eval pipeline (`decode_reduction`); ``None`` when it
    does not start with a resize (nothing to reduce)."""
    if leading_resize(transforms) is None:
        return None
    return lambda height, width: decode_reduction(transforms, height, width)


def decode_for_pipeline(buffer: np.ndarray, what: str, reduction: Callable[[int, int], int] | None,
                        max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, tuple[int, int]]:
    """An encoded image's bytes (a file's, or an upload's) as a resize that follows takes them:
    ``(image, (h, w))``, the image decoded ``reduction(h, w)`` times smaller (`pipeline_reduction`
    of an eval pipeline; ``None``: whole; JPEG only, whose header gives the size first) and the
    full image's ``(h, w)``. `ImageError` naming ``what`` for bytes that are empty, over
    ``max_pixels`` or not a decodable image."""
    header = read_header(buffer) if reduction is not None and buffer.size else None
    size = header.size if header is not None and header.format == "JPEG" else None
    reduce = reduction(*size) if size is not None else 1
    image = image_from_bytes(buffer, what, reduce, max_pixels)
    if reduce == 1:
        return image, image.shape[:2]
    if _decoded_from(image, reduce, *size):
        return image, size
    image = image_from_bytes(buffer, what, 1, max_pixels)  # the header and the decoder disagree: trust the pixels
    return image, image.shape[:2]
