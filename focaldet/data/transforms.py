"""Augmentation pipelines (albumentations) and batch collation.

Pipelines are built from plain config lists, so they can live in YAML::

    - {name: ResizeShortestEdge, min_size: [640, 672, 704, 736, 768, 800], max_size: 1333}
    - {name: HorizontalFlip, p: 0.5}

``name`` is a focaldet transform (`ResizeShortestEdge`), an albumentations class name, or a
dotted import path (``my_pkg.aug.MyTransform``) for a user's own transform; the other keys
are its constructor arguments. Containers (``OneOf``, ``SomeOf``, ...) take a nested
``transforms`` list. Boxes travel as ``pascal_voc`` (``xyxy`` pixels) with a ``labels``
field, so a transform that drops a box drops its label too. A dataset's ``iscrowd`` regions
travel as more boxes with the label ``-1`` (`focaldet.data.coco.CROWD`) and are split off
after, so they stay aligned with the image and the boxes whatever the pipeline does.

Note that albumentations' ``LongestMaxSize`` *always* rescales the longer side to
``max_size`` (it upscales too); use `ResizeShortestEdge` for the detectron2 rule
"shorter side to ``min_size``, unless the longer side would exceed ``max_size``".
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import albumentations as A
import albumentations.augmentations.geometric.functional as fgeometric
import cv2
import torch
from albumentations.augmentations.geometric.resize import MaxSizeTransform

from focaldet.errors import ConfigError
from focaldet.config.inputs import InputSettings, resized_size, shortest_edge_scale

__all__ = [
    "ResizeShortestEdge",
    "build_pipeline",
    "build_transform",
    "build_transforms",
    "collate_detection",
    "decode_reduction",
    "reduction_for_resize",
    "leading_resize",
    "shortest_edge_scale",
]


class ResizeShortestEdge(MaxSizeTransform):
    """Scale so the shorter side is ``min_size`` while the longer side stays <= ``max_size``.

    The scale is ``min(min_size / min(h, w), max_size / max(h, w))`` (detectron2's
    ``ResizeShortestEdge``, the RetinaNet paper's 800/1333); the output size is
    `focaldet.config.inputs.resized_size` (each side rounded half up) and boxes follow the actual
    size ratio. Pixels are interpolated with OpenCV's bit-exact bilinear
    (``INTER_LINEAR_EXACT``: the same bytes on every machine), which the export graph
    re-expresses exactly (`focaldet.export.graph.resize_bilinear_exact`), so an exported
    file sees the very pixels ``validate`` does.

    Args:
        min_size: target shorter side; a list picks one value at random per image
            (multi-scale training).
        max_size: cap on the longer side.
        interpolation: OpenCV interpolation flag (default ``cv2.INTER_LINEAR_EXACT``).
        p: probability of applying the transform.
    """

    def __init__(
        self,
        min_size: int | Sequence[int] = 800,
        max_size: int = 1333,
        interpolation: int = cv2.INTER_LINEAR_EXACT,
        p: float = 1.0,
    ) -> None:
        super().__init__(max_size=int(max_size), interpolation=interpolation, p=p)
        sizes = [min_size] if isinstance(min_size, int) else list(min_size)
        if not sizes or any(int(s) <= 0 for s in sizes) or int(max_size) <= 0:
            raise ValueError(f"ResizeShortestEdge: sizes must be positive, got min_size={min_size}, max_size={max_size}")
        self.min_size = min_size if isinstance(min_size, int) else [int(s) for s in sizes]

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        short = self.py_random.choice(self.min_size) if isinstance(self.min_size, list) else self.min_size
        size = resized_size(h, w, short, self.max_size)  # the one rule (focaldet.config.inputs)
        return {"scale": size[0] / h, "size": size}

    def apply(self, img, scale: float, size: tuple[int, int] = None, **params: Any):
        interpolation = self.interpolation
        if self.area_for_downscale in ["image", "image_mask"] and scale < 1.0:
            interpolation = cv2.INTER_AREA
        return fgeometric.resize(img, size, interpolation=interpolation)

    def apply_to_mask(self, mask, scale: float, size: tuple[int, int] = None, **params: Any):
        return fgeometric.resize(mask, size, interpolation=self.mask_interpolation)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("min_size", "max_size", "interpolation")


def decode_reduction(transforms: Any, height: int, width: int) -> int:
    """By how much (1, 2, 4 or 8) a ``height x width`` image may be decoded smaller before
    ``transforms`` run, losing nothing the pipeline keeps.

    When the pipeline always runs and starts with an always-applied `ResizeShortestEdge`
    whose largest possible scale is ``s``, it is the largest ``f`` with ``f * s <= 1``: the
    resize then still scales down, from an image that the decoder shrank by ``f`` (libjpeg's DCT
    scaling, much cheaper than decoding every pixel; other formats are decoded and
    resized by OpenCV). E.g. a 4032x3024 photo trained at 800 px decodes at 1/2. Otherwise 1.
    """
    first = leading_resize(transforms)
    return 1 if first is None else reduction_for_resize(height, width, first.min_size, first.max_size)


def reduction_for_resize(height: int, width: int, min_size: int | Sequence[int] | None, max_size: int) -> int:
    """The largest ``f`` in (8, 4, 2) with ``f * s <= 1``, else 1, where ``s`` is the largest scale
    a `ResizeShortestEdge(min_size, max_size)` applies to a ``height x width`` image (a list of
    ``min_size``: multi-scale, the largest; ``None``: no resize, 1). The rule of
    `decode_reduction`, for a resize outside a pipeline too (an exported graph's)."""
    if min_size is None:
        return 1
    sizes = list(min_size) if isinstance(min_size, (list, tuple)) else [min_size]
    scale = max(shortest_edge_scale(height, width, size, max_size) for size in sizes)
    return next((f for f in (8, 4, 2) if f * scale <= 1), 1)


def leading_resize(transforms: Any) -> ResizeShortestEdge | None:
    """The `ResizeShortestEdge` that every run of ``transforms`` starts with, if there is one:
    the pipeline always runs and its first step is an always-applied `ResizeShortestEdge`."""
    steps = getattr(transforms, "transforms", None)
    first = steps[0] if steps else None
    if not isinstance(first, ResizeShortestEdge) or first.p < 1 or getattr(transforms, "p", 1.0) < 1:
        return None
    return first


_FOCALDET_TRANSFORMS: dict[str, type] = {"ResizeShortestEdge": ResizeShortestEdge}


def _resolve(name: str) -> type:
    if name in _FOCALDET_TRANSFORMS:
        return _FOCALDET_TRANSFORMS[name]
    if "." not in name:
        cls = getattr(A, name, None)
        if cls is None:
            raise ConfigError(f"unknown transform {name!r}: not a focaldet or albumentations transform")
        return cls
    module_name, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot import transform {name!r}: {e}") from None


def build_transform(spec: Mapping[str, Any]) -> Any:
    """One transform from ``{"name": ..., **kwargs}`` (nested ``transforms`` for containers)."""
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ConfigError(f"a transform must be a mapping with a 'name' key, got {spec!r}")
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    name = str(spec["name"])
    cls = _resolve(name)
    if "transforms" in kwargs:
        kwargs["transforms"] = [build_transform(t) for t in kwargs["transforms"]]
    params = inspect.signature(cls).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise ConfigError(f"transform {name}: unknown argument(s) {unknown}; valid: {sorted(params)}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"transform {name}: {e}") from None


def build_pipeline(transforms: Sequence[Mapping[str, Any]], min_visibility: float = 0.0, seed: int | None = None) -> A.Compose:
    """Compose config dicts into a box-aware pipeline.

    Called as ``pipeline(image=(H, W, 3) uint8, bboxes=(G, 4) xyxy, labels=(G,))``; returns
    the same keys. Boxes are clipped to the image; a box whose visible fraction falls below
    ``min_visibility`` (or that leaves the image) is dropped together with its label.
    """
    return A.Compose(
        [build_transform(t) for t in transforms],
        bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"], min_visibility=min_visibility, clip=True),
        seed=seed,
    )


def build_transforms(
    train: bool,
    min_size: int | Sequence[int] = InputSettings.min_size,
    max_size: int = InputSettings.max_size,
    hflip_prob: float = 0.5,
    transforms: Sequence[Mapping[str, Any]] | None = None,
    min_visibility: float = 0.0,
    seed: int | None = None,
) -> A.Compose:
    """The train or eval pipeline.

    With ``transforms=None`` this is the RetinaNet/detectron2 recipe: shorter side to
    ``min_size`` (a list samples one per image in train; eval uses its largest value),
    longer side <= ``max_size``, and in train a horizontal flip with ``hflip_prob``.
    A ``transforms`` config list replaces that recipe entirely (include a resize yourself).
    """
    if transforms is None:
        if not train and not isinstance(min_size, int):
            min_size = max(min_size)
        transforms = [{"name": "ResizeShortestEdge", "min_size": min_size, "max_size": max_size}]
        if train and hflip_prob > 0:
            transforms.append({"name": "HorizontalFlip", "p": hflip_prob})
    return build_pipeline(transforms, min_visibility=min_visibility, seed=seed)


def collate_detection(batch: Sequence[Mapping[str, Any]], size_divisibility: int = InputSettings.size_divisibility) -> dict[str, Any]:
    """Stack dataset samples into a padded batch.

    Images are zero-padded at the bottom/right to a common size that is a multiple of
    ``size_divisibility`` (128 = the P7 stride). Returns::

        images       (N, 3, Hp, Wp) uint8, stored channels-last (NHWC strides, see below)
        image_sizes  (N, 2) int64  (h, w) after transforms, before padding
        orig_sizes   (N, 2) int64  (h, w) of the image files
        boxes        (N, Gmax, 4) float32 xyxy, zero-padded
        labels       (N, Gmax) int64, padded with -1 (``labels >= 0`` is the valid mask)
        crowd_boxes  (N, Cmax, 4) float32 xyxy ``iscrowd`` regions, zero-padded (a zero box
                     covers no anchor); Cmax = 0 when no image of the batch has one
        image_ids    (N,) int64
        file_names   list[str]

    Map detections back to original pixels with
    ``rescale_boxes(boxes, image_sizes[i], orig_sizes[i])``.

    The pixels are copied once: each sample's ``(3, H, W)`` image is a view of the decoder's
    ``(H, W, 3)`` array, and is copied row by row into an ``(N, Hp, Wp, 3)`` buffer -- in
    shared memory when this runs in a DataLoader worker, as ``default_collate`` does, so
    the batch reaches the main process without another copy (the small tensors travel
    pickled, see `_WorkerBatch`). The batch is that buffer
    seen as ``(N, 3, Hp, Wp)``: ``torch.channels_last``, the layout the model's
    convolutions run in.
    """
    if not batch:
        raise ValueError("collate_detection got an empty batch")
    n = len(batch)
    div = max(int(size_divisibility), 1)
    max_h = max(s["image"].shape[1] for s in batch)
    max_w = max(s["image"].shape[2] for s in batch)
    hp, wp = -(-max_h // div) * div, -(-max_w // div) * div
    gmax = max(len(s["labels"]) for s in batch)
    crowds = [s.get("crowd_boxes") for s in batch]  # absent for datasets that have none
    cmax = max((len(c) for c in crowds if c is not None), default=0)

    in_worker = torch.utils.data.get_worker_info() is not None
    if in_worker:  # shared memory, filled in place
        storage = torch.UntypedStorage._new_shared(n * hp * wp * 3)
        nhwc = torch.empty(0, dtype=torch.uint8).set_(storage).view(n, hp, wp, 3)
    else:
        nhwc = torch.empty((n, hp, wp, 3), dtype=torch.uint8)
    images = nhwc.permute(0, 3, 1, 2)  # (N, Hp, Wp, 3) -> (N, 3, Hp, Wp) view, channels_last
    boxes = torch.zeros((n, gmax, 4), dtype=torch.float32)
    labels = torch.full((n, gmax), -1, dtype=torch.int64)
    crowd_boxes = torch.zeros((n, cmax, 4), dtype=torch.float32)
    for i, s in enumerate(batch):
        _, h, w = s["image"].shape
        images[i, :, :h, :w] = s["image"]
        nhwc[i, h:] = 0  # the padding below and to the right
        nhwc[i, :h, w:] = 0
        g = len(s["labels"])
        boxes[i, :g] = s["boxes"]
        labels[i, :g] = s["labels"]
        if crowds[i] is not None:
            crowd_boxes[i, : len(crowds[i])] = crowds[i]
    return (_WorkerBatch if in_worker else dict)({
        "images": images,
        "image_sizes": torch.tensor([s["size"] for s in batch], dtype=torch.int64).reshape(n, 2),
        "orig_sizes": torch.tensor([s["orig_size"] for s in batch], dtype=torch.int64).reshape(n, 2),
        "boxes": boxes,
        "labels": labels,
        "crowd_boxes": crowd_boxes,
        "image_ids": torch.tensor([s["image_id"] for s in batch], dtype=torch.int64),
        "file_names": [s["file_name"] for s in batch],
    })


class _WorkerBatch(dict):
    """A batch as it leaves a DataLoader worker. The images travel in the shared memory they
    were collated into; the small tensors (sizes, boxes, labels, ids: a few KB) are pickled
    as arrays, since sharing each would cost a shared-memory segment and a file-descriptor
    hand-over per tensor and batch (measured: +10-13 % images/s for decode + collate on BCCD).
    The main process receives a plain dict of tensors."""

    def __reduce__(self):
        arrays = {k: v.numpy() for k, v in self.items() if isinstance(v, torch.Tensor) and k != "images"}
        rest = {k: v for k, v in self.items() if k not in arrays}
        return _rebuild_batch, (rest, arrays)


def _rebuild_batch(rest: dict[str, Any], arrays: dict[str, Any]) -> dict[str, Any]:
    return {**rest, **{k: torch.from_numpy(v) for k, v in arrays.items()}}
