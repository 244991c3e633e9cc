"""COCO-format detection data: JSON loading with readable errors, label maps, datasets.

Inside focaldet boxes are float ``xyxy`` pixels and labels are contiguous ``0..K-1``; the
COCO ``xywh`` boxes and arbitrary category ids only exist in the JSON files. `LabelMap`
converts between category ids and labels in both directions and is stored in checkpoints.

A dataset sample is a dict::

    image      (3, H, W) uint8 tensor, RGB, after transforms (the model normalises);
               a view of the decoded (H, W, 3) array
    boxes      (G, 4) float32 xyxy, in pixels of the transformed image
    labels     (G,) int64 contiguous labels
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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset

from focaldet.data.transforms import decode_reduction, leading_resize
from focaldet.errors import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "CocoDetection",
    "DataWarning",
    "ImageError",
    "ImageFolderDataset",
    "LabelMap",
    "jpeg_size",
    "load_coco",
    "read_coco_json",
    "read_image",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# A box narrower or lower than this (pixels, after clipping to the image) is not trained on.
MIN_BOX_SIDE = 1.0


class DataWarning(UserWarning):
    """Dataset content that focaldet works around (e.g. degenerate boxes it drops)."""


class ImageError(DataError):
    """An image file is missing, unreadable or disagrees with its JSON entry.

    Raised from ``__getitem__``, so usually inside a DataLoader worker. PyTorch re-raises a
    worker's exception in the main process as ``type(exc)(text)`` where *text* is the whole
    worker traceback; this class trims that back to the one-line message (plus the worker
    it came from), so users still read ``cannot read image ...`` and not a traceback dump.
    """

    def __init__(self, message: str) -> None:
        super().__init__(_unwrap_worker_message(message))


def _unwrap_worker_message(message: str) -> str:
    """``"Caught X in DataLoader worker process 0.\\nOriginal Traceback ... X: msg"`` -> one line."""
    if not (message.startswith("Caught ") and "\nOriginal Traceback" in message):
        return message
    where = message.split("\n", 1)[0].rstrip(".").split(" in ", 1)[-1]
    last = [line for line in message.strip().splitlines() if line.strip()][-1]
    _, sep, text = last.partition(": ")  # "focaldet.data.coco.ImageError: cannot read ..."
    return f"{text if sep else last} [{where}]"


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
    """Parse a COCO instances JSON; `DataError` naming file, line and column on bad syntax.

    Only the top-level structure is checked here (an object with ``images`` and
    ``categories`` lists; ``annotations`` may be absent, as in image-info files).
    """
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
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with 'images' and 'categories', got {type(data).__name__}")
    data.setdefault("annotations", [])
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: missing or invalid '{key}' list")
    return data


def _check_references(data: dict, path: Path) -> None:
    """Raise `DataError` for the first inconsistency that would make training wrong."""
    image_ids: set = set()
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or any(k not in img for k in ("id", "file_name", "width", "height")):
            raise DataError(f"{path}: images[{i}] needs 'id', 'file_name', 'width' and 'height': {img!r}")
        if img["id"] in image_ids:
            raise DataError(f"{path}: duplicate image id {img['id']}")
        image_ids.add(img["id"])
    cat_ids: set = set()
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat:
            raise DataError(f"{path}: categories[{i}] has no 'id': {cat!r}")
        if cat["id"] in cat_ids:
            raise DataError(f"{path}: duplicate category id {cat['id']}")
        cat_ids.add(cat["id"])
    ann_ids: set = set()
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "id" not in ann:
            raise DataError(f"{path}: annotations[{i}] has no 'id'")
        aid = ann["id"]
        if aid in ann_ids:
            raise DataError(f"{path}: duplicate annotation id {aid}")
        ann_ids.add(aid)
        if ann.get("image_id") not in image_ids:
            raise DataError(f"{path}: annotation {aid} refers to image id {ann.get('image_id')!r}, which is not in 'images'")
        if ann.get("category_id") not in cat_ids:
            raise DataError(
                f"{path}: annotation {aid} has category id {ann.get('category_id')!r}, "
                f"which is not in 'categories' {sorted(cat_ids)}"
            )
        bbox = ann.get("bbox")
        if not (
            isinstance(bbox, (list, tuple))
            and len(bbox) == 4
            and all(isinstance(v, (int, float)) and np.isfinite(v) for v in bbox)
        ):
            raise DataError(f"{path}: annotation {aid} has an invalid bbox {bbox!r}; expected [x, y, w, h]")


def load_coco(path: str | os.PathLike) -> COCO:
    """Parse, validate and index a COCO JSON into a pycocotools ``COCO`` (without its prints).

    Raises `DataError` for malformed JSON (file, line, column), duplicate ids, annotations
    pointing at a missing image or an unknown category, and invalid bboxes.
    """
    path = Path(path)
    data = read_coco_json(path)
    _check_references(data, path)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


# --------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------


# OpenCV >= 4.11 decodes straight to RGB (libjpeg-turbo writes RGB): no BGR -> RGB pass.
_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)
_IMREAD_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def _imread_flags(reduce: int) -> int:
    """OpenCV flags decoding to RGB when OpenCV can (>= 4.11), else BGR, at ``1/reduce`` size."""
    if reduce not in (1, *_IMREAD_REDUCED):
        raise ValueError(f"reduce must be 1, 2, 4 or 8, got {reduce}")
    flags = cv2.IMREAD_COLOR if reduce == 1 else _IMREAD_REDUCED[reduce]
    return (flags & ~cv2.IMREAD_COLOR) | _IMREAD_RGB if _IMREAD_RGB else flags


def read_image(path: str | os.PathLike, image_id: int | None = None, reduce: int = 1) -> np.ndarray:
    """Decode an image file to ``(H, W, 3)`` uint8 RGB (EXIF orientation applied, as OpenCV does).

    ``reduce`` 2, 4 or 8 decodes it that many times smaller on each side (JPEG: scaled in
    the DCT, ``ceil(H / reduce)`` rows; other formats: resized by OpenCV).

    Raises `ImageError` naming the path (and the image id, when given) if the file is
    missing or cannot be decoded.
    """
    what = f"image {path}" + (f" (image id {image_id})" if image_id is not None else "")
    flags = _imread_flags(reduce)
    try:
        buffer = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise ImageError(f"cannot read {what}: file not found") from None
    except OSError as e:
        raise ImageError(f"cannot read {what}: {e.strerror or e}") from None
    image = cv2.imdecode(buffer, flags) if buffer.size else None
    if image is None:
        raise ImageError(f"cannot read {what}: not a decodable image (corrupt or unsupported format)")
    return image if _IMREAD_RGB else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _decoded_from(image: np.ndarray, reduce: int, height: int, width: int) -> bool:
    """Whether ``image``, decoded at ``1/reduce``, is an image of ``height x width``
    (``ceil(height / reduce)`` rows; exact when ``reduce == 1``)."""
    h, w = image.shape[:2]
    return abs(h * reduce - height) < reduce and abs(w * reduce - width) < reduce


def _apply_transforms(
    transforms: Callable | None, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray
) -> dict[str, Any]:
    """Run an albumentations-style callable and pack the result as tensors."""
    if transforms is not None:
        out = transforms(image=image, bboxes=boxes, labels=labels)
        image = out["image"]
        boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
        # Transforms may leave slivers; a box must keep a positive extent to be learnable.
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, labels = boxes[keep], labels[keep]
    h, w = image.shape[:2]
    return {
        # (H, W, 3) -> (3, H, W) view, no copy: the collate copies it once, into the batch
        "image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1),
        "boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.as_tensor(labels, dtype=torch.int64).reshape(-1),
        "size": (int(h), int(w)),
    }


# --------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------


class CocoDetection(Dataset):
    """Detection dataset over a COCO instances JSON and an image folder.

    Boxes are converted to ``xyxy`` and clipped to the image size given in the JSON;
    ``iscrowd=1`` annotations are not trained on; boxes narrower or lower than 1 px after
    clipping are dropped and counted (one `DataWarning` per dataset). Images without boxes
    are kept unless ``filter_empty``.

    Args:
        ann_file: COCO instances JSON.
        image_dir: folder the JSON ``file_name`` entries are relative to.
        transforms: albumentations-style callable ``f(image=, bboxes=, labels=) -> dict``
            (see `focaldet.data.transforms.build_transforms`); ``None`` keeps the image as is.
        filter_empty: drop images that have no trainable box (as detectron2 does in training).
        coco: an already parsed ``COCO`` of ``ann_file`` (e.g. the datamodule's cached one).
        label_map: expected label map (e.g. from a checkpoint); must have the JSON's category ids.

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
    ) -> None:
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        self.transforms = transforms
        self.coco = coco if coco is not None else load_coco(self.ann_file)
        json_map = LabelMap.from_categories(self.coco.dataset["categories"])
        if label_map is not None and label_map.cat_ids != json_map.cat_ids:
            raise DataError(
                f"{self.ann_file}: category ids {json_map.cat_ids} differ from the label map's {label_map.cat_ids}"
            )
        self.label_map = label_map or json_map
        self.num_crowd = 0
        self.num_degenerate = 0
        degenerate_ids: list = []

        self.records: list[dict[str, Any]] = []
        for image_id in sorted(self.coco.imgs):
            img = self.coco.imgs[image_id]
            height, width = int(img["height"]), int(img["width"])
            boxes, labels = [], []
            for ann in self.coco.imgToAnns.get(image_id, []):
                if ann.get("iscrowd", 0):
                    self.num_crowd += 1
                    continue
                x, y, w, h = (float(v) for v in ann["bbox"])
                x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
                x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
                if x2 - x1 <= MIN_BOX_SIDE or y2 - y1 <= MIN_BOX_SIDE:
                    self.num_degenerate += 1
                    degenerate_ids.append(ann["id"])
                    continue
                boxes.append((x1, y1, x2, y2))
                labels.append(self.label_map.to_label(ann["category_id"]))
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
        return [r["image_id"] for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.records[index]
        image, boxes = self._read(rec)
        sample = _apply_transforms(self.transforms, image, boxes, rec["labels"])
        sample.update(
            image_id=int(rec["image_id"]),
            orig_size=(rec["height"], rec["width"]),
            file_name=rec["file_name"],
        )
        return sample

    def _read(self, rec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """The record's image and boxes, decoded as small as the transforms allow
        (`decode_reduction`): the boxes are scaled to the decoded image."""
        path, height, width = self.image_dir / rec["file_name"], rec["height"], rec["width"]
        reduce = decode_reduction(self.transforms, height, width)
        image = read_image(path, rec["image_id"], reduce)
        h, w = image.shape[:2]
        if not _decoded_from(image, reduce, height, width):
            if reduce > 1:  # name the size on disk, not the reduced one
                h, w = read_image(path, rec["image_id"]).shape[:2]
            raise ImageError(f"image {path} (image id {rec['image_id']}) is {w}x{h} (w x h) on disk "
                             f"but {width}x{height} in {self.ann_file}")
        if reduce == 1:
            return image, rec["boxes"]
        return image, rec["boxes"] * np.array([w / width, h / height] * 2, dtype=np.float32)


def jpeg_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """``(h, w)`` of a JPEG file as `read_image` decodes it (EXIF orientation applied), read
    from its header alone; ``None`` for another format or an unreadable file."""
    from PIL import Image, UnidentifiedImageError  # Pillow comes with torchvision

    try:
        with Image.open(path) as image:
            if image.format != "JPEG":
                return None
            w, h = image.size
            orientation = image.getexif().get(0x0112, 1)  # 5-8: turned by 90 degrees
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return None  # the full decode names the problem
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


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
        if not self.image_dir.is_dir():
            raise DataError(f"image folder {self.image_dir} does not exist")
        self.transforms = transforms
        self.files = sorted(
            p.relative_to(self.image_dir).as_posix()
            for p in self.image_dir.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        if not self.files:
            raise DataError(f"image folder {self.image_dir} has no images ({', '.join(IMAGE_EXTENSIONS)})")

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
        size = jpeg_size(path) if leading_resize(self.transforms) is not None else None
        reduce = decode_reduction(self.transforms, *size) if size is not None else 1
        image = read_image(path, index, reduce)
        if reduce == 1:
            return image, image.shape[:2]
        if _decoded_from(image, reduce, *size):
            return image, size
        image = read_image(path, index)  # the header and the decoder disagree: trust the pixels
        return image, image.shape[:2]
