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


def confusion_figure(cm: ConfusionMatrix):
    """A matplotlib ``Figure`` of the matrix: counts in the cells, colour = share of the row,
    axes named, and the meaning of the background row and column written under it."""
    from matplotlib.figure import Figure

    n = len(cm.labels)
    side = max(4.0, 0.6 * n + 2.5)
    fig = Figure(figsize=(side, side + 0.6), dpi=100, layout="constrained")
    ax = fig.subplots()
    rows = cm.matrix.sum(axis=1, keepdims=True)
    share = np.divide(cm.matrix, rows, out=np.zeros(cm.matrix.shape, float), where=rows > 0)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm.matrix[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), cm.labels, rotation=45, ha="right")
    ax.set_yticks(range(n), cm.labels)
    ax.set(xlabel="predicted", ylabel="true (ground truth)", title="Confusion matrix (IoU 0.5, F1 thresholds)")
    fig.text(0.5, 0.0, "Background column = missed ground truth (no detection).\n"
             "Background row = false detections (no box under them).", ha="center", va="bottom", fontsize=8,
             wrap=True)
    fig.get_layout_engine().set(rect=(0, 0.06, 1, 0.94))
    return fig


def plot_confusion(cm: ConfusionMatrix, path: str | os.PathLike) -> Path:
    """Save :func:`confusion_figure` as a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    confusion_figure(cm).savefig(path)
    return path
