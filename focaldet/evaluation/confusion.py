"""Confusion matrix of detections against ground truth, with a background class.

Rows are the ground truth (true class), columns the prediction; the last row and column
are "background". So, with K classes:

- ``m[i, j]``, ``i, j < K``: a class-``i`` box detected as class ``j`` (the diagonal is the
  correct detections);
- ``m[i, K]`` (background column): a class-``i`` box no detection found (missed);
- ``m[K, j]`` (background row): a class-``j`` detection with no box under it (false alarm).

Matching, per image, detections in descending score order (those below their class's
score threshold dropped, at most ``max_dets`` per image): first to an unmatched box of the
same class at IoU >= ``iou``, as COCOeval does; a detection left over that lies on a
crowd region (intersection over the detection's area >= ``iou``, COCO's crowd rule) is
ignored; the rest are then matched to an unmatched box of another class at IoU >= ``iou``
(a confusion), and what still has no box is background.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou

BACKGROUND = "background"
MEANING = ("rows: ground truth, columns: prediction. Background column: boxes no detection found (missed). "
           "Background row: detections with no box under them (false detections).")


@dataclass
class ConfusionMatrix:
    """``matrix`` ``(K+1, K+1)`` int counts, rows truth, columns prediction, index K background."""

    matrix: np.ndarray
    class_names: list[str]

    @property
    def labels(self) -> list[str]:
        return [*self.class_names, BACKGROUND]


def _xyxy(xywh: Sequence[Sequence[float]]) -> torch.Tensor:
    b = torch.as_tensor(xywh, dtype=torch.float64).reshape(-1, 4)
    return torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], dim=1)  # (N, 4) xywh -> xyxy


def _greedy(iou: torch.Tensor, order_ok: torch.Tensor, gt_free: torch.Tensor, thresh: float) -> torch.Tensor:
    """For detections in row order (only rows with ``order_ok``), the index of the best free gt
    at IoU >= ``thresh`` (-1 when none); marks matched gts in ``gt_free`` in place."""
    match = torch.full((iou.shape[0],), -1, dtype=torch.long)
    for d in range(iou.shape[0]):
        if not order_ok[d]:
            continue
        cand = torch.where(gt_free, iou[d], -1.0)  # (G,)
        best = int(cand.argmax()) if cand.numel() else -1
        if best >= 0 and cand[best] >= thresh:
            match[d] = best
            gt_free[best] = False
    return match


def confusion_matrix(
    gt_dataset: Mapping[str, Any],
    results: Sequence[Mapping[str, Any]],
    cat_ids: Sequence[int],
    class_names: Sequence[str],
    score_thresholds: Sequence[float] | float = 0.0,
    iou: float = 0.5,
    max_dets: int = 100,
    image_ids: Sequence[int] | None = None,
) -> ConfusionMatrix:
    """Count detections against ground truth (see the module docstring for the rules).

    Args:
        gt_dataset: a COCO instances dict (``COCO.dataset``). results: COCO result entries.
        cat_ids: category id of each class, in class order. class_names: their names.
        score_thresholds: per class (same order), or one number; nan means "keep none".
        image_ids: count only these images (default: all images of the ground truth).
    """
    k_of = {int(c): k for k, c in enumerate(cat_ids)}
    num_classes = len(cat_ids)
    thr = np.broadcast_to(np.asarray(score_thresholds, dtype=float), (num_classes,))
    images = [int(i["id"]) for i in gt_dataset["images"]] if image_ids is None else [int(i) for i in image_ids]
    gts: dict[int, list] = defaultdict(list)
    for a in gt_dataset.get("annotations", []):
        if int(a["category_id"]) in k_of:
            gts[int(a["image_id"])].append(a)
    dts: dict[int, list] = defaultdict(list)
    for r in results:
        k = k_of.get(int(r["category_id"]))
        if k is not None and r["score"] >= thr[k]:  # nan threshold: comparison is False
            dts[int(r["image_id"])].append(r)

    m = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    bg = num_classes
    for image_id in images:
        anns = gts.get(image_id, [])
        plain = [a for a in anns if not a.get("iscrowd", 0)]
        crowd = [a for a in anns if a.get("iscrowd", 0)]
        dets = sorted(dts.get(image_id, []), key=lambda r: -r["score"])[:max_dets]  # stable: ties in input order
        gt_k = torch.tensor([k_of[int(a["category_id"])] for a in plain], dtype=torch.long)
        dt_k = torch.tensor([k_of[int(r["category_id"])] for r in dets], dtype=torch.long)
        gt_boxes, dt_boxes = _xyxy([a["bbox"] for a in plain]), _xyxy([r["bbox"] for r in dets])
        iou_m = box_iou(dt_boxes, gt_boxes)  # (D, G)
        same = dt_k[:, None] == gt_k[None, :]  # (D, G)
        free = torch.ones(len(plain), dtype=torch.bool)
        # pass 1: same class only (COCOeval's matching)
        first = _greedy(torch.where(same, iou_m, -1.0), torch.ones(len(dets), dtype=torch.bool), free, iou)
        left = first < 0
        if crowd and len(dets):
            cb = _xyxy([a["bbox"] for a in crowd])
            lt = torch.maximum(dt_boxes[:, None, :2], cb[None, :, :2])
            rb = torch.minimum(dt_boxes[:, None, 2:], cb[None, :, 2:])
            inter = (rb - lt).clamp(min=0).prod(dim=2)  # (D, C)
            area = (dt_boxes[:, 2:] - dt_boxes[:, :2]).prod(dim=1).clamp(min=1e-12)
            on_crowd = ((inter / area[:, None]) >= iou).any(dim=1)
            left &= ~on_crowd
        # pass 2: the rest against boxes of other classes
        second = _greedy(torch.where(same, -1.0, iou_m), left, free, iou)
        for d in range(len(dets)):
            if first[d] >= 0:
                m[gt_k[first[d]], dt_k[d]] += 1
            elif second[d] >= 0:
                m[gt_k[second[d]], dt_k[d]] += 1
            elif left[d]:
                m[bg, dt_k[d]] += 1
        for g in torch.nonzero(free).flatten().tolist():
            m[gt_k[g], bg] += 1
    return ConfusionMatrix(m, [str(n) for n in class_names])


def write_confusion_csv(cm: ConfusionMatrix, path: str | os.PathLike) -> Path:
    """``confusion_matrix.csv``: header ``true \\ predicted, <classes>, background``, one row per truth."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true \\ predicted", *cm.labels])
        for name, row in zip(cm.labels, cm.matrix.tolist()):
            w.writerow([name, *row])
    return path


def row_normalised(cm: ConfusionMatrix) -> np.ndarray:
    """``(K+1, K+1)`` float: each row divided by its sum (the share of each true class that
    went to each prediction); rows without boxes are nan."""
    rows = cm.matrix.sum(axis=1, keepdims=True).astype(float)
    return np.divide(cm.matrix, rows, out=np.full(cm.matrix.shape, np.nan), where=rows > 0)


def _cell_text_color(rgba) -> str:
    """Black on light cells, white on dark ones (Rec. 709 luminance)."""
    r, g, b = rgba[:3]
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.5 else "white"


def confusion_figure(cm: ConfusionMatrix, normalize: bool = False,
                     subtitle: str = "IoU 0.5, detections at the per-class F1 score thresholds"):
    """A matplotlib ``Figure`` of the matrix, legible from 1 to 80+ classes.

    ``normalize=False``: counts in the cells, colour by count on a square-root scale (a
    frequent class does not wash out the rest). ``normalize=True``: each row as % of its
    true class (:func:`row_normalised`), colour by that share. Cell text is black or white
    by the cell's brightness; zeros are left blank past 20 classes; a dashed line sets off
    the background row and column. The figure grows with the class count (cells of
    0.5 in down to 0.3 in, fonts 9 down to 6 pt), the title sits inside the figure
    (constrained layout), and the style's grid is off.
    """
    from matplotlib.colors import Normalize, PowerNorm
    from matplotlib.figure import Figure

    labels = cm.labels
    n = len(labels)
    cell = 0.5 if n <= 12 else 0.38 if n <= 30 else 0.3  # inches
    cell_pt = 9 if n <= 12 else 7 if n <= 30 else 6
    tick_pt = 9 if n <= 30 else 7
    longest = max(len(x) for x in labels)
    margin = 0.9 + 0.075 * tick_pt / 7 * longest  # room for the rotated/left tick labels
    side = n * cell
    fig = Figure(figsize=(max(5.5, side + margin + 1.4), max(4.5, side + margin + 1.3)), dpi=100,
                 layout="constrained")
    ax = fig.subplots()
    if normalize:
        values = row_normalised(cm)
        norm, cmap, bar_label = Normalize(0, 1), "Blues", "share of the true class"
        shown = np.where(np.isnan(values), 0.0, values)
    else:
        values = cm.matrix.astype(float)
        norm, cmap, bar_label = PowerNorm(0.5, vmin=0, vmax=max(1.0, float(values.max()))), "Blues", "count (sqrt scale)"
        shown = values
    image = ax.imshow(shown, cmap=cmap, norm=norm, interpolation="nearest", aspect="equal")
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(False)
    for i in range(n):
        for j in range(n):
            count = int(cm.matrix[i, j])
            if count == 0 and (n > 20 or normalize):
                continue
            text = f"{100 * values[i, j]:.0f}" if normalize else str(count)
            if normalize and text == "0":
                text = "<1"
            color = _cell_text_color(image.cmap(norm(shown[i, j]))) if count else "0.6"
            ax.text(j, i, text, ha="center", va="center", fontsize=cell_pt, color=color)
    bg = n - 1
    ax.axhline(bg - 0.5, color="0.45", lw=1, ls="--")
    ax.axvline(bg - 0.5, color="0.45", lw=1, ls="--")
    ax.set_xticks(range(n), labels, rotation=90 if n > 12 else 45, ha="center" if n > 12 else "right",
                  fontsize=tick_pt)
    ax.set_yticks(range(n), labels, fontsize=tick_pt)
    ax.tick_params(length=0)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (ground truth)")
    fig.colorbar(image, ax=ax, shrink=min(0.8, 4 / max(side, 1) + 0.3), label=bar_label)
    kind = "row-normalised, % of each true class" if normalize else "counts"
    fig.suptitle(f"Confusion matrix ({kind})\n{subtitle}", fontsize=11)
    fig.supxlabel("Background column: ground truth no detection found (missed).\n"
                  "Background row: detections with no box under them (false detections).", fontsize=8)
    return fig


def plot_confusion(cm: ConfusionMatrix, path: str | os.PathLike, normalize: bool = False) -> Path:
    """Save :func:`confusion_figure` as a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    confusion_figure(cm, normalize).savefig(path)
    return path
