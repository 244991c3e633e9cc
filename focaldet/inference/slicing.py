"""Sliced inference for large images (SAHI's scheme: Akyon et al., 2022).

A large image is cut into overlapping windows; each window is prepared as any image is
(the eval pipeline of `InputSettings`: resized to ``min_size``/``max_size``, padded) and run
through the model in batches; the detections are shifted back into the image and merged
with class-aware NMS. Optionally the whole image is run too (SAHI's "standard prediction"),
for the objects larger than a window. Small objects are then seen at the window's scale
instead of downsized with the whole image.

The pieces, paired and pure:

- `slice_windows`: the windows of an ``H x W`` image (SAHI's ``get_slice_bboxes`` geometry);
- `shift_boxes`: boxes of a window -> boxes of the image;
- `merge_detections`: class-aware NMS (``torchvision.ops.batched_nms``) + the per-image cap;
- `sliced_detections`: the driver used by ``focaldet.api.Detector`` and ``RetinaNetModule``.

The settings are one dataclass, `Slicing`, the one home of their defaults.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import batched_nms

from focaldet.config.recipe import dataclass_of
from focaldet.errors import ConfigError

__all__ = ["Slicing", "merge_detections", "shift_boxes", "slice_windows", "sliced_detections"]


@dataclass(frozen=True)
class Slicing:
    """How sliced inference cuts an image (``--model.slicing.size 512`` on the CLI,
    ``Detector.predict(..., slicing=Slicing(512))`` in Python).

    Args:
        size: side of the square windows, in original-image pixels (SAHI's
            ``slice_height``/``slice_width``). Each window is then resized as the model's
            input settings say (shorter side to ``min_size``), so a window of ``min_size``
            pixels runs at the image's native resolution.
        overlap: fraction of ``size`` that neighbouring windows share
            (``int(overlap * size)`` pixels, SAHI's ``overlap_*_ratio``); in [0, 1).
        full_image: also run the whole image (resized as without slicing), for the objects
            larger than a window (SAHI's ``perform_standard_pred``). Skipped when one window
            already is the whole image.
        batch_size: windows per forward pass.
    """

    size: int = 512
    overlap: float = 0.2
    full_image: bool = True
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise ConfigError(f"slicing.size must be a positive number of pixels, got {self.size!r}")
        if not 0 <= float(self.overlap) < 1:
            raise ConfigError(f"slicing.overlap must be in [0, 1), got {self.overlap!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"slicing.batch_size must be a positive integer, got {self.batch_size!r}")

    @classmethod
    def of(cls, value: Slicing | Mapping[str, Any] | None) -> Slicing | None:
        """A `Slicing` from itself, a mapping of its fields (YAML, checkpoints) or None."""
        return dataclass_of(cls, value, "slicing")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def windows(self, height: int, width: int) -> Tensor:
        """`slice_windows` of an ``height x width`` image with these settings."""
        return slice_windows(height, width, self.size, self.overlap)


def _starts(length: int, size: int, step_overlap: int) -> list[int]:
    """Window starts along one axis: every ``size - step_overlap`` pixels; the window that
    would run past the end is shifted back to end at ``length`` (at 0 when ``length < size``)."""
    starts, lo = [], 0
    while True:
        if lo + size >= length:
            starts.append(max(0, length - size))
            return starts
        starts.append(lo)
        lo += size - step_overlap


def slice_windows(height: int, width: int, size: int, overlap: float = 0.2) -> Tensor:
    """The windows sliced inference runs on, ``(S, 4)`` int64 ``x0, y0, x1, y1`` (row by row).

    SAHI's ``get_slice_bboxes`` geometry: windows of ``size x size`` every
    ``size - int(overlap * size)`` pixels from the top-left corner; the last window of a row
    (column) that would run past the image is shifted back so that it ends at the border,
    and a side shorter than ``size`` gets one window of its length. E.g. a 1000 px side, size
    512, overlap 0.2 (102 px): starts 0, 410, 488.
    """
    if height < 1 or width < 1:
        raise ConfigError(f"cannot slice an image of {width}x{height} (w x h) pixels")
    step_overlap = int(overlap * size)
    ys, xs = _starts(height, size, step_overlap), _starts(width, size, step_overlap)
    y0 = torch.tensor(ys, dtype=torch.int64).repeat_interleave(len(xs))  # (S,) rows outer
    x0 = torch.tensor(xs, dtype=torch.int64).repeat(len(ys))  # (S,) columns inner
    return torch.stack([x0, y0, (x0 + size).clamp(max=width), (y0 + size).clamp(max=height)], 1)


def shift_boxes(boxes: Tensor, offset: Sequence[int] | Tensor) -> Tensor:
    """``xyxy`` boxes ``(M, 4)`` of a window whose top-left corner is ``offset = (x0, y0)``
    in the image -> the same boxes in image pixels."""
    x0, y0 = (float(v) for v in offset)
    return boxes + boxes.new_tensor([x0, y0, x0, y0])


def merge_detections(detections: Sequence[Mapping[str, Tensor]], iou_threshold: float,
                     max_dets: int) -> dict[str, Tensor]:
    """One image's detections from several passes (in image pixels) -> its final detections:
    class-aware NMS (``torchvision.ops.batched_nms`` keyed by label), then the best
    ``max_dets``, by decreasing score."""
    boxes = torch.cat([d["boxes"].reshape(-1, 4) for d in detections])  # (M, 4)
    scores = torch.cat([d["scores"].reshape(-1) for d in detections])  # (M,)
    labels = torch.cat([d["labels"].reshape(-1) for d in detections])  # (M,)
    keep = batched_nms(boxes.float(), scores.float(), labels, iou_threshold)[:max_dets]  # by decreasing score
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


def sliced_detections(images: Sequence[Tensor], detect: Callable[[dict], list[dict[str, Tensor]]],
                      slicing: Slicing, transforms: Any, size_divisibility: int, iou_threshold: float,
                      max_dets: int) -> list[dict[str, Tensor]]:
    """Detections of original-resolution images, by slices.

    Args:
        images: ``(3, H, W)`` uint8 RGB images at their original resolution (CPU tensors).
        detect: runs the model on a collated batch (``focaldet.data.transforms.collate_detection``)
            and returns each image's detections in its ``orig_sizes`` pixels (what
            ``focaldet.inference.Predictor.detect`` does).
        slicing: the windows (and whether to add the whole image).
        transforms: the eval pipeline each window (and the whole image) goes through
            (``InputSettings.eval_pipeline()``).
        size_divisibility: batch padding.
        iou_threshold, max_dets: the merge's NMS threshold and per-image cap (the model's
            ``postprocess.nms_thresh`` and ``detections_per_img``).

    Returns ``[{"boxes": (M, 4) xyxy in image pixels, "scores": (M,), "labels": (M,)}]``, one
    per image, sorted by decreasing score.
    """
    from focaldet.data.coco import _apply_transforms
    from focaldet.data.transforms import collate_detection

    pieces: list[tuple[int, list[int]]] = []  # (image index, window x0 y0 x1 y1)
    for i, image in enumerate(images):
        h, w = image.shape[-2:]
        windows = slicing.windows(h, w).tolist()
        if slicing.full_image and len(windows) > 1:
            windows.append([0, 0, w, h])
        pieces += [(i, win) for win in windows]

    found: list[list[dict[str, Tensor]]] = [[] for _ in images]
    empty_boxes, empty_labels = np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)
    for start in range(0, len(pieces), slicing.batch_size):
        chunk = pieces[start:start + slicing.batch_size]
        samples = []
        for j, (i, (x0, y0, x1, y1)) in enumerate(chunk):
            crop = np.ascontiguousarray(images[i][:, y0:y1, x0:x1].permute(1, 2, 0).numpy())  # (3, h, w) -> (h, w, 3)
            sample = _apply_transforms(transforms, crop, empty_boxes, empty_labels)
            sample.update(image_id=start + j, orig_size=(y1 - y0, x1 - x0), file_name="")
            samples.append(sample)
        for (i, (x0, y0, _, _)), det in zip(chunk, detect(collate_detection(samples, size_divisibility))):
            found[i].append({"boxes": shift_boxes(det["boxes"], (x0, y0)), "scores": det["scores"],
                             "labels": det["labels"]})
    return [merge_detections(dets, iou_threshold, max_dets) for dets in found]
