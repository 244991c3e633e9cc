"""Anchor statistics of a dataset: best possible recall (BPR) and anchors fitted to the boxes.

**BPR** is the share of boxes that have at least one anchor at IoU >= 0.5 (the matcher's
positive threshold): a box without one is only learnt through the matcher's
``allow_low_quality_matches`` (its best anchor, however poor), if at all. YOLOv5's AutoAnchor
reports a "Best Possible Recall" too, from width/height ratios alone; here it is RetinaNet's
own criterion, the IoU of the box with the anchors *at their grid positions*: every image
is resized as focaldet's eval pipeline does (`InputSettings`: shorter side ``min_size``,
longer side at most ``max_size``), padded to ``size_divisibility``, and the anchors are
exactly those `AnchorGenerator` makes for that padded input. Boxes much smaller than a
level's stride reach IoU 0.5 only when a grid centre happens to lie close to theirs, which
is why position matters.

**Why only the nearest grid centre counts.** For one anchor shape, the overlap of a box and
an anchor along x depends only on their centres' x distance (and shrinks as it grows), the
same along y. So the best anchor of a given shape on a level is the one centred on the grid
point nearest the box's centre (nearest column, nearest row), and the best IoU of a box is
``max over (level, shape)`` of its IoU with that one anchor. `relative_boxes` translates
each box so that its nearest centre on each level is the origin; the IoU with the level's
cell anchors (centred at the origin) is then one `box_iou` per level.

**The fit** (`fit_anchors`) keeps the strides and the number of anchors per location
``A = len(scales) * len(aspect_ratios)`` (so the head's shapes, and pretrained head
weights, still fit) and searches, by coordinate descent on a sample of boxes, the anchor
size of every level (non-decreasing from P3 to P7, as the pyramid's receptive fields grow),
the octave scales, the aspect ratios and the centre offset (0 or 0.5): each step tries a
range of values for one of them with the others fixed and keeps the best by the number of
boxes at IoU >= 0.5 (ties broken towards near misses getting closer), with steps shrinking
from 1/4 to 1/64 octave, from several starting points; a last pass raises the mean best IoU
without losing a box. `unreachable` tells which boxes no anchor shape at all
can reach at the grid positions: the ceiling of any fit with those strides and offset.
"""

from __future__ import annotations

import math
import textwrap
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import box_iou

from focaldet.errors import ConfigError, DataError
from focaldet.recipe import read_config_file
from focaldet.inputs import InputSettings
from focaldet.modeling.anchors import AnchorGenerator

__all__ = [
    "AnchorAnalysis",
    "AnchorFit",
    "AnchorReport",
    "DatasetBoxes",
    "InputBoxes",
    "analyse_anchors",
    "best_ious",
    "best_possible_recall",
    "check_image_files",
    "fit_anchors",
    "generator_args",
    "input_boxes",
    "input_sizes",
    "read_anchor_config",
    "read_boxes",
    "relative_boxes",
    "unreachable",
]

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


@dataclass
class AnchorFit:
    """What `fit_anchors` returns: the fitted generator (values rounded as printed) and its
    BPR on the fitting sample and on all boxes."""

    generator: AnchorGenerator
    sample: AnchorReport  # on the fitting sample
    report: AnchorReport  # on all boxes
    num_sample: int
    evaluations: int  # candidate anchor sets scored
    unreachable: int = 0  # sample boxes that no anchor shape reaches at the fitted positions

    @property
    def ceiling(self) -> float:
        """The best BPR any anchor shapes could have on the sample at the fitted strides and offset."""
        return 1 - self.unreachable / max(self.num_sample, 1)

    def init_args(self) -> dict[str, Any]:
        """The ``init_args`` of ``model.anchor_generator`` (plain lists)."""
        return generator_args(self.generator)


def generator_args(generator: AnchorGenerator) -> dict[str, Any]:
    """``init_args`` reproducing ``generator`` (offset and strides only when not the defaults)."""
    args: dict[str, Any] = {
        "sizes": [_plain(s) for s in generator.sizes],
        "scales": [_plain(s) for s in generator.scales],
        "aspect_ratios": [_plain(r) for r in generator.aspect_ratios],
    }
    if generator.strides != AnchorGenerator().strides:
        args["strides"] = list(generator.strides)
    if generator.offset != 0.0:
        args["offset"] = generator.offset
    if generator.torchvision_compat:
        args["torchvision_compat"] = True
    return args


def _plain(v: float) -> float | int:
    v = float(v)
    return int(v) if v.is_integer() else v


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
    level ``l`` (of the grid ``generator`` makes for the box's padded input) is the origin."""
    boxes = inputs.boxes
    num_levels = len(generator.strides)
    out = torch.empty(len(boxes), num_levels, 4, dtype=torch.float32)
    pads, inverse = torch.unique(inputs.padded, dim=0, return_inverse=True)  # (U, 2), (G,)
    cx = (boxes[:, 0] + boxes[:, 2]) / 2  # (G,)
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    for u, (ph, pw) in enumerate(pads.tolist()):
        rows = torch.nonzero(inverse == u).squeeze(1)
        shapes = generator.feature_shapes(ph, pw)
        grids = generator.grids(shapes, "cpu", image_size=(ph, pw))
        for level, grid in enumerate(grids):
            x0 = grid.xs[grid.nearest(cx[rows], axis=0)]  # (g,) nearest column centre
            y0 = grid.ys[grid.nearest(cy[rows], axis=1)]
            out[rows, level] = boxes[rows] - torch.stack([x0, y0, x0, y0], dim=1)
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


def _generator_cells(generator: AnchorGenerator) -> Tensor:
    """``(L, A, 4)`` the generator's cell anchors (its own rounding), centred at the origin."""
    shapes = generator.feature_shapes(1, 1)
    return torch.stack([g.cell for g in generator.grids(shapes, "cpu")])


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
    cells = _generator_cells(generator)  # (L, A, 4)
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


# --------------------------------------------------------------------------------------
# The fit
# --------------------------------------------------------------------------------------


class _Search:
    """Coordinate descent over log2 anchor sizes ``(L,)``, log2 scales ``(S,)`` and log2
    aspect ratios ``(R,)`` for one offset, on the relative boxes ``rel (G, L, 4)``.

    An anchor ``(l, r, s)`` is ``w = 2**(size_l + scale_s - ratio_r / 2)`` wide and
    ``h = 2**(size_l + scale_s + ratio_r / 2)`` high (``ratio = h / w``, as `AnchorGenerator`).

    The score of an anchor set is the number of boxes at IoU >= threshold plus the mean of
    ``min(best IoU, threshold) / threshold`` (below 1: it only breaks ties, rewarding near
    misses that get closer). A box that an unchanged anchor already covers contributes the
    same to both terms whatever the changed coordinate is, so each trial scores only the
    other boxes -- exactly the same score, much less work.
    """

    def __init__(self, rel: Tensor, params: dict[str, Tensor], iou_threshold: float) -> None:
        self.rel, self.thr = rel, iou_threshold
        self.polish = False  # True: break ties by the mean best IoU of all boxes instead
        self.monotone = True  # keep the sizes non-decreasing from level to level
        self.params = {k: v.clone() for k, v in params.items()}
        self.evaluations = 0
        self.ious = self._all()  # (G, L, R, S)

    @staticmethod
    def _wh(sizes: Tensor, scales: Tensor, ratios: Tensor) -> Tensor:
        """``(..., 2)`` widths and heights for broadcastable log2 sizes, scales, ratios."""
        side = sizes + scales
        return torch.stack([torch.exp2(side - ratios / 2), torch.exp2(side + ratios / 2)], dim=-1)

    def _all(self) -> Tensor:
        p = self.params
        wh = self._wh(p["sizes"][:, None, None], p["scales"][None, None, :], p["ratios"][None, :, None])  # (L, R, S, 2)
        num_levels, num_ratios, num_scales = wh.shape[:3]
        ious = best_ious(self.rel, _cells(wh).reshape(num_levels, -1, 4))  # (G, L, R*S)
        return ious.reshape(-1, num_levels, num_ratios, num_scales)

    def current(self) -> float:
        best = self.ious.flatten(1).amax(dim=1)  # (G,)
        tie = best.double().mean() if self.polish else (best.clamp(max=self.thr) / self.thr).double().mean()
        return float((best >= self.thr).sum() + tie)

    def _try(self, name: str, index: int, values: Tensor) -> Tensor:
        """Scores ``(C,)`` of setting ``params[name][index]`` to each of ``values (C,)``."""
        p = self.params
        num_boxes, num_levels, num_ratios, num_scales = self.ious.shape
        keep = torch.ones(num_levels, num_ratios, num_scales, dtype=torch.bool)  # the unchanged anchors
        if name == "sizes":
            keep[index] = False
        elif name == "ratios":
            keep[:, index, :] = False
        else:
            keep[:, :, index] = False
        rest = self.ious[:, keep].amax(dim=1) if keep.any() else torch.zeros(num_boxes)  # (G,)
        if self.polish:  # every box's IoU counts
            open_ = torch.arange(num_boxes)
        else:
            open_ = torch.nonzero(rest < self.thr).squeeze(1)  # (U,) boxes the change can win or lose
        num_safe = num_boxes - len(open_)
        if len(open_) == 0:  # every box keeps an anchor at IoU >= threshold whatever the value
            self.evaluations += len(values)
            return torch.full((len(values),), num_boxes + 1.0, dtype=torch.float64)
        rel = self.rel[open_]  # (U, L, 4)
        if name == "sizes":  # level `index`: (C, R, S) new anchors on one level
            wh = self._wh(values[:, None, None], p["scales"][None, None, :], p["ratios"][None, :, None])  # (C, R, S, 2)
            new = best_ious(rel[:, index : index + 1], _cells(wh).reshape(1, -1, 4))  # (U, 1, C*R*S)
            new = new.reshape(len(open_), len(values), -1).amax(dim=2)  # (U, C)
        else:  # one ratio (or scale) on every level: (L, C, S) (or (L, C, R)) new anchors
            if name == "ratios":
                wh = self._wh(p["sizes"][:, None, None], p["scales"][None, None, :], values[None, :, None])
            else:
                wh = self._wh(p["sizes"][:, None, None], values[None, :, None], p["ratios"][None, None, :])
            new = best_ious(rel, _cells(wh).reshape(num_levels, -1, 4))  # (U, L, C*k)
            new = new.reshape(len(open_), num_levels, len(values), -1).amax(dim=(1, 3))  # (U, C)
        best = torch.maximum(new, rest[open_, None])  # (U, C)
        self.evaluations += len(values)
        hits = num_safe + (best >= self.thr).sum(0).double()  # (C,)
        if self.polish:
            return hits + best.double().mean(0)
        return hits + (num_safe * self.thr + best.clamp(max=self.thr).double().sum(0)) / (num_boxes * self.thr)

    def descend(self, steps: Sequence[float], span: float = 2.0, max_rounds: int = 10) -> float:
        """Coordinate descent at each step size (octaves): the first tries values within
        ``span`` octaves of the current one, the others within 4 steps; each repeats rounds
        over all coordinates until one improves nothing. Returns the score."""
        best = self.current()
        for i, step in enumerate(steps):
            k = max(1, round(span / step)) if i == 0 else 4
            offsets = torch.arange(-k, k + 1, dtype=torch.float64) * step  # (C,), 0 at index k
            for _ in range(max_rounds):
                improved = False
                for name in ("sizes", "scales", "ratios"):
                    for index in range(len(self.params[name])):
                        if name == "scales" and index == 0:
                            continue  # sizes carry the overall scale: scales[0] stays 2**0
                        values = self.params[name][index] + offsets
                        scores = self._try(name, index, values)
                        if name == "sizes" and self.monotone:  # sizes[l - 1] <= sizes[l] <= sizes[l + 1]
                            sizes = self.params["sizes"]
                            lo = sizes[index - 1] if index > 0 else -math.inf
                            hi = sizes[index + 1] if index + 1 < len(sizes) else math.inf
                            scores = torch.where((values >= lo - 1e-12) & (values <= hi + 1e-12), scores, -math.inf)
                        choice = int(scores.argmax())
                        if scores[choice] > best + 1e-9:
                            best, improved = float(scores[choice]), True
                            self.params[name][index] = values[choice]
                            self.ious = self._all()
                if not improved:
                    break
        return best


def _log2_params(sizes: Sequence[float], scales: Sequence[float], ratios: Sequence[float]) -> dict[str, Tensor]:
    """log2 parameters with ``scales[0]`` moved into the sizes (so it is 2**0)."""
    log_scales = torch.tensor(scales, dtype=torch.float64).log2()
    return {
        "sizes": torch.tensor(sizes, dtype=torch.float64).log2() + log_scales[0],
        "scales": log_scales - log_scales[0],
        "ratios": torch.tensor(ratios, dtype=torch.float64).log2(),
    }


def _starts(start: AnchorGenerator) -> list[dict[str, Tensor]]:
    """Starting points of the descent: ``start``'s own anchors, then ladders doubling per
    level (as the strides do) from 1.5, 2 and 3 times the finest stride, with ``start``'s
    scales and ratios (the descent moves them; several starts avoid its local optima)."""
    strides = torch.tensor(start.strides, dtype=torch.float64)  # (L,)
    ladders = [(strides * f).tolist() for f in (1.5, 2.0, 3.0)]
    return [_log2_params(sorted(sizes), start.scales, start.aspect_ratios) for sizes in [start.sizes, *ladders]]


@contextmanager
def _threads(n: int):
    """Run with ``n`` torch threads: the search's small tensor ops run fastest on one (and
    many times faster on a busy machine); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_anchors(
    boxes: Tensor | InputBoxes,
    image_sizes: Tensor | None,
    settings: InputSettings | None = None,
    start: AnchorGenerator | None = None,
    iou_threshold: float = IOU_THRESHOLD,
    sample_size: int = 5000,
    seed: int = 0,
    offsets: Sequence[float] = (0.0, 0.5),
) -> AnchorFit:
    """Anchors maximising the BPR of ``boxes`` (see `best_possible_recall` for the arguments).

    Keeps ``start``'s strides and its numbers of scales and aspect ratios (so ``A``, and the
    head's shapes, stay) and fits the per-level sizes, the scales, the ratios and the offset
    (each of ``offsets``) on a random sample of at most ``sample_size`` boxes (``seed``):
    coordinate descent (`_Search`) from each of `_starts` in steps of 1/4 and 1/16 octave,
    the two best refined in steps of 1/64, then polished (as many boxes covered, or more, at
    a higher mean best IoU). The result is rounded (sizes to 0.01 px, scales and ratios to
    1e-4) and evaluated through a real `AnchorGenerator` of those values, on the sample and
    on all boxes; ``unreachable`` counts the sample's boxes that no anchor shape could cover
    at its positions. It is never worse on the sample than ``start``:
    ``start`` itself is returned when nothing beats it.
    """
    start = start if start is not None else AnchorGenerator()
    if not isinstance(boxes, InputBoxes):
        boxes = input_boxes(boxes, image_sizes, settings or InputSettings())
    if len(boxes) == 0:
        raise ValueError("fit_anchors: no boxes")
    rng = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(boxes), generator=rng)[:sample_size].sort().values  # (N,)
    sample = boxes.subset(index)

    with _threads(1):
        rel = {o: relative_boxes(sample, AnchorGenerator(strides=start.strides, offset=o)) for o in offsets}
        searches = []
        for offset in offsets:  # explore: every start, coarse and medium steps
            for params in _starts(start):
                search = _Search(rel[offset], params, iou_threshold)
                searches.append((search.descend((1 / 4, 1 / 16)), offset, search))
        searches.sort(key=lambda r: -r[0])
        refined = []
        for _, offset, search in searches[:2]:  # refine the two best, then raise their mean IoU
            search.descend((1 / 64,))
            search.polish = True
            search.descend((1 / 4, 1 / 16, 1 / 64), span=2.0)
            refined.append(_rounded(start.strides, offset, search.params))
        evaluations = sum(s.evaluations for _, _, s in searches)
        candidates = [*refined, start]
        reports = [best_possible_recall(sample, None, g, iou_threshold=iou_threshold) for g in candidates]
        choice = max(range(len(candidates)), key=lambda i: (reports[i].bpr, reports[i].mean_best_iou, -i))
        fitted = candidates[choice]
        report = best_possible_recall(boxes, None, fitted, iou_threshold=iou_threshold)
        missed = torch.nonzero(reports[choice].best_iou < iou_threshold).squeeze(1)  # (M,) sample misses
        lost = int(unreachable(sample.subset(missed), fitted, iou_threshold).sum())
    return AnchorFit(fitted, reports[choice], report, len(sample), evaluations, lost)


def _rounded(strides: Sequence[int], offset: float, params: dict[str, Tensor]) -> AnchorGenerator:
    """An `AnchorGenerator` of log2 ``params``, scales sorted and normalised to start at 1
    (sizes absorb the factor), ratios sorted; rounded as printed."""
    scales = torch.exp2(params["scales"]).sort().values  # (S,)
    sizes = torch.exp2(params["sizes"]) * scales[0]  # (L,)
    scales = scales / scales[0]
    ratios = torch.exp2(params["ratios"]).sort().values  # (R,)
    return AnchorGenerator(
        sizes=[round(float(s), 2) for s in sizes],
        strides=strides,
        scales=[round(float(s), 4) for s in scales],
        aspect_ratios=[round(float(r), 4) for r in ratios],
        offset=offset,
    )


# --------------------------------------------------------------------------------------
# A dataset's analysis (what ``focaldet data anchors`` prints)
# --------------------------------------------------------------------------------------


@dataclass
class DatasetBoxes:
    """The trainable boxes of a COCO file (non-crowd, clipped, larger than ``MIN_BOX_SIDE``:
    the loader's rules) with their image sizes."""

    boxes: Tensor  # (G, 4) float32 xyxy, original pixels
    image_sizes: Tensor  # (G, 2) int64 (H, W) of each box's image
    num_images: int
    file_names: list[str]  # of every valid image entry


def read_boxes(ann_file: str | Path) -> DatasetBoxes:
    """Read and validate a COCO instances JSON (`focaldet.data.validate`, as the loader does);
    `DataError` naming the file for a missing or malformed file, invalid entries or no
    trainable box."""
    from focaldet.data.coco import read_coco_json
    from focaldet.data.validate import validate_coco

    checked = validate_coco(read_coco_json(ann_file))
    errors = checked.problems.errors
    if errors:
        raise DataError(f"{ann_file}: {' | '.join(errors)}")
    boxes, sizes = [], []
    for image_id, items in checked.boxes.items():
        image = checked.images[image_id]
        for _, _, box in items:
            boxes.append(box)
            sizes.append((int(image["height"]), int(image["width"])))
    if not boxes:
        raise DataError(f"{ann_file}: no boxes to fit anchors to ({len(checked.images)} images, "
                        f"{checked.num_boxes} boxes of which none is trainable: crowd or at most 1 px)")
    return DatasetBoxes(torch.tensor(boxes, dtype=torch.float32), torch.tensor(sizes, dtype=torch.int64),
                        len(checked.images), [str(img["file_name"]) for img in checked.images.values()])


def check_image_files(image_dir: str | Path, file_names: Sequence[str]) -> None:
    """`DataError` when ``image_dir`` is not a folder or lacks files of ``file_names`` (only
    their existence is checked; ``focaldet data check`` decodes them)."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise DataError(f"image folder {image_dir} does not exist")
    missing = [name for name in file_names if not (image_dir / name).is_file()]
    if missing:
        more = f", ... ({len(missing) - 5} more)" if len(missing) > 5 else ""
        raise DataError(f"{image_dir}: {len(missing)} of {len(file_names)} image files are missing: "
                        f"{', '.join(missing[:5])}{more}")


def read_anchor_config(path: str | Path) -> tuple[AnchorGenerator | None, dict[str, Any]]:
    """``(model.anchor_generator or None, data arguments)`` of a focaldet YAML config;
    `ConfigError` for a missing file, invalid YAML or an anchor generator that cannot be built."""
    cfg = read_config_file(path)

    def section(name: str) -> dict:
        value = cfg.get(name) or {}
        if isinstance(value, dict) and "class_path" in value:
            value = value.get("init_args") or {}
        return dict(value) if isinstance(value, dict) else {}

    data = {k: v for k, v in section("data").items() if k in ("min_size", "max_size", "size_divisibility",
                                                               "eval_transforms")}
    spec = section("model").get("anchor_generator")
    if spec is None:
        return None, data
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: model.anchor_generator is not a mapping")
    class_path = str(spec.get("class_path", "AnchorGenerator"))
    if class_path.rsplit(".", 1)[-1] != "AnchorGenerator":
        raise ConfigError(f"{path}: model.anchor_generator.class_path {class_path} is not an AnchorGenerator")
    try:
        return AnchorGenerator(**(spec.get("init_args") or {})), data
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: model.anchor_generator: {e}") from None


@dataclass
class AnchorAnalysis:
    """The current anchors' BPR and the fitted ones' on a dataset (`analyse_anchors`)."""

    ann_file: str
    settings: InputSettings
    num_images: int
    current: AnchorReport
    current_generator: AnchorGenerator
    fit: AnchorFit
    seconds: float  # the fit (and the reports)
    default_sizes: bool = False  # settings are InputSettings' defaults, not the user's (says so in format)

    def yaml(self) -> str:
        """The block to paste into a config."""
        args = ", ".join(f"{k}: {_yaml_value(v)}" for k, v in self.fit.init_args().items())
        return ("model:\n  anchor_generator:\n    class_path: focaldet.models.AnchorGenerator\n"
                f"    init_args: {{{args}}}\n")

    def to_dict(self) -> dict[str, Any]:
        g = self.fit.generator
        return {
            "annotations": self.ann_file,
            "min_size": self.settings.min_size,
            "max_size": self.settings.max_size,
            "size_divisibility": self.settings.size_divisibility,
            "num_images": self.num_images,
            "num_boxes": self.current.num_boxes,
            "num_anchors_per_location": g.num_anchors,
            "current": {"init_args": generator_args(self.current_generator), **self.current.to_dict()},
            "fitted": {"init_args": self.fit.init_args(), **self.fit.report.to_dict(),
                       "sample": self.fit.sample.to_dict(),
                       "unreachable_in_sample": self.fit.unreachable, "ceiling_in_sample": self.fit.ceiling,
                       "candidates_scored": self.fit.evaluations},
            "seconds": self.seconds,
        }

    def format(self) -> str:
        cur, fit, f, g = self.current, self.fit.report, self.fit, self.fit.generator
        s = self.settings
        size = "not resized" if s.min_size is None else f"resized to min_size {s.min_size}, max_size {s.max_size}"
        sampled = f.num_sample < fit.num_boxes
        lines = [
            f"focaldet data anchors: {self.ann_file}",
            f"  {cur.num_boxes} boxes in {self.num_images} images, {size}, "
            f"padded to a multiple of {s.size_divisibility}",
        ]
        if self.default_sizes:
            lines.append("  (the default sizes: give your training sizes with --min-size/--max-size or -c CONFIG)")
        lines += [
            f"  BPR (best possible recall): share of boxes with an anchor at IoU >= {cur.iou_threshold:g}",
            "",
            f"  {'':<15}{'BPR':>8}{'mean best IoU':>15}  | boxes per level (of their best anchor)",
            f"  {'':<15}{'':>8}{'':>15}  |" + "".join(f"{'P' + str(int(math.log2(st))):>7}" for st in cur.strides),
        ]
        rows = [("current", cur), ("fitted", fit)] + ([("fitted, sample", f.sample)] if sampled else [])
        for name, r in rows:
            lines.append(f"  {name:<15}{_pct(r.bpr):>8}{r.mean_best_iou:>15.3f}  |"
                         + "".join(f"{100 * v:>6.1f}%" for v in r.level_share))
        bins = [f"{lo:g}-{hi:g}" if not math.isinf(hi) else f">={lo:g}" for lo, hi, _, _ in cur.misses_by_size]
        lines += ["", "  missed / boxes, by sqrt(area) in input px:",
                  f"  {'':<15}" + "".join(f"{b:>11}" for b in bins)]
        for name, r in rows[:2]:
            lines.append(f"  {name:<15}" + "".join(f"{f'{m}/{n}':>11}" for _, _, n, m in r.misses_by_size))
        missed = round((1 - f.sample.bpr) * f.num_sample)
        lines.append("")
        if missed:
            lines += _wrap(
                f"{f.unreachable} of the {missed} boxes the fitted anchors miss{' in the sample' if sampled else ''} "
                f"cannot reach IoU {cur.iou_threshold:g} with any anchor shape at their nearest anchor centres "
                f"(strides {g.strides[0]}-{g.strides[-1]} px, offset {g.offset:g}): small and far from every centre; "
                f"no anchors on this grid exceed {_pct(f.ceiling)}")
        same = g.num_anchors == self.current_generator.num_anchors
        lines += _wrap(
            f"fit: {f.evaluations} candidate anchor sets scored on {f.num_sample} boxes in {self.seconds:.1f} s; "
            f"A = {g.num_anchors} anchors per location ({len(g.scales)} scales x {len(g.aspect_ratios)} aspect ratios)"
            + (", as now: the head's shapes (and pretrained head weights) still fit" if same else ""))
        if g is self.current_generator:
            lines.append("  the current anchors are the best found: nothing to change")
        lines += ["", "paste into your config (replaces model.anchor_generator):", self.yaml().rstrip()]
        return "\n".join(lines)


def _wrap(text: str) -> list[str]:
    return textwrap.wrap(text, width=100, initial_indent="  ", subsequent_indent="    ")


def _yaml_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_yaml_value(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v)


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%"


def analyse_anchors(
    ann_file: str | Path,
    settings: InputSettings,
    current: AnchorGenerator | None = None,
    sample_size: int = 5000,
    seed: int = 0,
    data: DatasetBoxes | None = None,
) -> AnchorAnalysis:
    """BPR of ``current`` (default `AnchorGenerator()`, COCO's anchors) on ``ann_file``'s boxes
    at ``settings``, and anchors fitted to them (`fit_anchors`)."""
    t0 = time.perf_counter()
    data = data if data is not None else read_boxes(ann_file)
    current = current if current is not None else AnchorGenerator()
    inputs = input_boxes(data.boxes, data.image_sizes, settings)
    report = best_possible_recall(inputs, None, current)
    fit = fit_anchors(inputs, None, start=current, sample_size=sample_size, seed=seed)
    return AnchorAnalysis(str(ann_file), settings, data.num_images, report, current, fit, time.perf_counter() - t0)
