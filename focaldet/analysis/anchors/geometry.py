"""Boxes as the network sees them and the best possible recall (BPR) of an anchor generator
on them (see `focaldet.analysis.anchors`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import box_iou

from focaldet.config.inputs import InputSettings
from focaldet.modeling.anchors import AnchorGenerator, cell_anchors, centred_on_nearest_anchor


IOU_THRESHOLD = 0.5  # the matcher's positive threshold
BLOCK = 1 << 18  # IoU entries computed at once (1 MiB of float32: cache-sized blocks are fastest)
CHUNK = 1 << 16  # boxes scored at once by best_possible_recall
SIZE_BINS = (8, 16, 32, 64, 128, 256, 512)  # sqrt(area) bin edges (input px) of the miss table


@dataclass(frozen=True)
class InputBoxes:
    """Boxes as the network sees them: resized like their image, with its padded size."""

    boxes: Tensor  # (G, 4) float32 xyxy, network-input pixels
    padded: Tensor  # (G, 2) int64 padded (H, W) of each box's input image

    def __len__(self) -> int:
        return self.boxes.shape[0]

    def subset(self, index: Tensor) -> InputBoxes:
        return InputBoxes(self.boxes[index], self.padded[index])


@dataclass
class AnchorReport:
    """What `best_possible_recall` found for one anchor generator on a set of boxes."""

    num_boxes: int
    bpr: float  # share of boxes whose best anchor has IoU >= iou_threshold
    mean_best_iou: float  # mean over boxes of the best anchor IoU
    level_share: list[float]  # (L,) share of boxes whose best anchor is on each level
    strides: list[int]  # (L,)
    iou_threshold: float = IOU_THRESHOLD
    # sqrt(area) bins in input px: (low, high, boxes, missed); high is inf for the last
    misses_by_size: list[tuple[float, float, int, int]] = field(default_factory=list)
    best_iou: Tensor | None = field(default=None, repr=False)  # (G,)
    best_level: Tensor | None = field(default=None, repr=False)  # (G,) int64

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_boxes": self.num_boxes,
            "bpr": self.bpr,
            "mean_best_iou": self.mean_best_iou,
            "iou_threshold": self.iou_threshold,
            "level_share": {f"P{int(math.log2(s))}": v for s, v in zip(self.strides, self.level_share)},
            "misses_by_size": [
                {"sqrt_area_min": lo, "sqrt_area_max": None if math.isinf(hi) else hi, "boxes": n, "missed": m}
                for lo, hi, n, m in self.misses_by_size
            ],
        }


# --------------------------------------------------------------------------------------
# Boxes as the network sees them
# --------------------------------------------------------------------------------------


def input_sizes(image_sizes: Tensor, settings: InputSettings) -> tuple[Tensor, Tensor]:
    """``(resized, padded)``, each ``(N, 2)`` int64 ``(H, W)``, of images of ``image_sizes``
    ``(N, 2)``: focaldet's eval resize (`InputSettings.resized_size`; no resize when
    ``min_size`` is None), then the padding to ``size_divisibility``."""
    hw = torch.as_tensor(image_sizes, dtype=torch.int64).reshape(-1, 2)
    distinct, inverse = torch.unique(hw, dim=0, return_inverse=True)  # (U, 2), (N,): one call per size
    resized = torch.tensor([settings.resized_size(h, w) for h, w in distinct.tolist()],
                           dtype=torch.float64).reshape(-1, 2)[inverse]  # (N, 2)
    div = max(int(settings.size_divisibility), 1)
    padded = torch.ceil(resized / div) * div
    return resized.long(), padded.long()


def input_boxes(boxes: Tensor, image_sizes: Tensor, settings: InputSettings) -> InputBoxes:
    """Boxes ``(G, 4)`` xyxy in original pixels of images of ``image_sizes`` ``(G, 2)`` (H, W),
    scaled by the actual size ratio of their image's resize, as the transforms do."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    image_sizes = torch.as_tensor(image_sizes, dtype=torch.int64).reshape(-1, 2)
    if len(boxes) != len(image_sizes):
        raise ValueError(f"{len(boxes)} boxes but {len(image_sizes)} image sizes")
    resized, padded = input_sizes(image_sizes, settings)  # (G, 2) each
    ratio = (resized.double() / image_sizes.double()).flip(1)  # (G, 2): (x, y) = (W, H) ratios
    return InputBoxes((boxes.double() * ratio.repeat(1, 2)).float(), padded)  # (G, 2) -> (G, 4)


def relative_boxes(inputs: InputBoxes, generator: AnchorGenerator) -> Tensor:
    """``(G, L, 4)``: each box translated so that the anchor centre nearest its centre on
    level ``l`` (of the grid ``generator`` makes for the box's padded input) is the origin
    (`focaldet.modeling.anchors.centred_on_nearest_anchor`, per padded size)."""
    out = torch.empty(len(inputs.boxes), len(generator.strides), 4, dtype=torch.float32)
    pads, inverse = torch.unique(inputs.padded, dim=0, return_inverse=True)  # (U, 2), (G,)
    for u, padded in enumerate(pads.tolist()):
        rows = torch.nonzero(inverse == u).squeeze(1)
        out[rows] = centred_on_nearest_anchor(inputs.boxes[rows], padded, generator)
    return out


def _cells(wh: Tensor) -> Tensor:
    """``(..., 2)`` anchor widths and heights -> ``(..., 4)`` xyxy anchors centred at the origin."""
    half = wh / 2
    return torch.cat([-half, half], dim=-1)


def best_ious(rel: Tensor, cells: Tensor) -> Tensor:
    """IoU of every box with every cell anchor of its own level: ``rel (G, L, 4)`` (from
    `relative_boxes`), ``cells (L, C, 4)`` centred at the origin -> ``(G, L, C)``. Computed
    with `box_iou` in blocks of boxes, so memory stays bounded."""
    num_boxes, num_levels = rel.shape[:2]
    num_cells = cells.shape[1]
    out = torch.empty(num_boxes, num_levels, num_cells, dtype=torch.float32)
    step = max(1, BLOCK // max(num_cells, 1))
    for level in range(num_levels):
        for i in range(0, num_boxes, step):
            out[i : i + step, level] = box_iou(rel[i : i + step, level], cells[level])  # (g, C)
    return out


# --------------------------------------------------------------------------------------
# Best possible recall
# --------------------------------------------------------------------------------------


def best_possible_recall(
    boxes: Tensor | InputBoxes,
    image_sizes: Tensor | None,
    generator: AnchorGenerator,
    settings: InputSettings | None = None,
    iou_threshold: float = IOU_THRESHOLD,
) -> AnchorReport:
    """BPR of ``generator`` on ``boxes`` ``(G, 4)`` xyxy in original pixels of images of
    ``image_sizes`` ``(G, 2)`` (H, W), resized and padded per ``settings`` (default
    `InputSettings()`); or on `InputBoxes` already resized (``image_sizes`` ignored).

    Same best IoU as ``box_iou(box, generator(shapes)).max()`` over all anchors of the box's
    padded input (see the module docstring for why the nearest centre suffices).
    """
    if not isinstance(boxes, InputBoxes):
        boxes = input_boxes(boxes, image_sizes, settings or InputSettings())
    cells = cell_anchors(generator)  # (L, A, 4)
    level_best = torch.empty(len(boxes), len(generator.strides))  # (G, L)
    for i in range(0, len(boxes), CHUNK):  # bounded memory on COCO-sized sets
        rows = torch.arange(i, min(i + CHUNK, len(boxes)))
        rel = relative_boxes(boxes.subset(rows), generator)  # (g, L, 4)
        level_best[rows] = best_ious(rel, cells).amax(dim=2)  # (g, L, A) -> (g, L)
    return _report(boxes, level_best, list(generator.strides), iou_threshold)


def _report(inputs: InputBoxes, level_best: Tensor, strides: list[int], iou_threshold: float) -> AnchorReport:
    """The report of per-level best IoUs ``level_best (G, L)``."""
    num_boxes, num_levels = level_best.shape
    if num_boxes == 0:
        return AnchorReport(0, 0.0, 0.0, [0.0] * num_levels, strides, iou_threshold)
    best, level = level_best.max(dim=1)  # (G,), (G,)
    hit = best >= iou_threshold
    share = torch.bincount(level, minlength=num_levels).double() / num_boxes  # (L,)
    wh = inputs.boxes[:, 2:] - inputs.boxes[:, :2]
    side = wh.prod(dim=1).clamp(min=0).sqrt()  # (G,) sqrt(area), input px
    edges = [0.0, *SIZE_BINS, math.inf]
    misses = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        rows = (side >= lo) & (side < hi)
        if rows.any():
            misses.append((lo, hi, int(rows.sum()), int((rows & ~hit).sum())))
    return AnchorReport(num_boxes, float(hit.double().mean()), float(best.double().mean()), share.tolist(), strides,
                        iou_threshold, misses, best, level)


def unreachable(inputs: InputBoxes, generator: AnchorGenerator, iou_threshold: float = IOU_THRESHOLD,
                steps: int = 64) -> Tensor:
    """``(G,)`` bool: the boxes that *no* anchor shape reaches at IoU >= ``iou_threshold`` at
    the grid positions of ``generator`` (its strides and offset; its shapes do not matter),
    typically boxes much smaller than the finest stride whose centre lies far from every
    grid centre. No fit with these strides and offset can cover them.

    IoU >= t needs an anchor side within a factor 2 of the box's (else the overlap is at most
    half the larger box), so widths and heights ``box side * 2**(k / steps)``, ``|k| <= steps``,
    are tried on every level at the nearest centre; IoU = ix * iy / (area + wa * ha - ix * iy)
    with the 1-D overlaps ix, iy of the centred anchor.
    """
    out = torch.zeros(len(inputs), dtype=torch.bool)
    if len(inputs) == 0:
        return out
    t = torch.exp2(torch.arange(-steps, steps + 1, dtype=torch.float32) / steps)  # (T,)
    num_levels, num_t = len(generator.strides), len(t)
    step = max(1, (1 << 22) // (num_levels * num_t * num_t))
    for i in range(0, len(inputs), step):
        rows = torch.arange(i, min(i + step, len(inputs)))
        rel = relative_boxes(inputs.subset(rows), generator)  # (g, L, 4)
        lo, hi = rel[..., :2], rel[..., 2:]  # (g, L, 2) box corners relative to the centre
        half = (hi - lo)[..., None] * t / 2  # (g, L, 2, T) half anchor sides on each axis
        overlap = torch.minimum(hi[..., None], half) - torch.maximum(lo[..., None], -half)  # (g, L, 2, T)
        overlap = overlap.clamp(min=0)
        inter = overlap[:, :, 0, :, None] * overlap[:, :, 1, None, :]  # (g, L, T, T): widths x heights
        area_a = 4 * half[:, :, 0, :, None] * half[:, :, 1, None, :]  # (g, L, T, T)
        area_b = (hi - lo).prod(dim=2)[..., None, None]  # (g, L, 1, 1)
        best = (inter / (area_b + area_a - inter)).flatten(1).amax(dim=1)  # (g,)
        out[rows] = best < iou_threshold
    return out


