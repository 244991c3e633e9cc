"""Anchors fitted to a dataset's boxes (`fit_anchors`; see `focaldet.analysis.anchors`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from focaldet.analysis.anchors.geometry import (
    IOU_THRESHOLD,
    AnchorReport,
    InputBoxes,
    _cells,
    best_ious,
    best_possible_recall,
    input_boxes,
    relative_boxes,
    unreachable,
)
from focaldet.config.inputs import InputSettings
from focaldet.modeling.anchors import AnchorGenerator


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
        """The ``init_args`` of ``model.model.anchor_generator`` (plain lists)."""
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


