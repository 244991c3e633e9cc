"""Anchor-to-ground-truth matching by IoU, batched over the images of a batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_iou

BACKGROUND, IGNORE, FOREGROUND = 0, -1, 1


@dataclass
class Matches:
    """Result of matching ``R`` anchors against the ground truth of ``N`` images.

    Attributes:
        gt_index: ``(N, R)`` int64 index of the matched ground-truth box of each anchor
            (meaningful where ``labels == FOREGROUND``; 0 elsewhere).
        labels: ``(N, R)`` int8: ``1`` foreground, ``0`` background, ``-1`` ignored.
    """

    gt_index: Tensor
    labels: Tensor


class Matcher:
    """IoU matcher of RetinaNet: IoU >= 0.5 foreground, < 0.4 background, in between ignored.

    Args:
        fg_iou_thresh: IoU at and above which an anchor is foreground.
        bg_iou_thresh: IoU below which an anchor is background.
        allow_low_quality_matches: also make foreground, for every ground-truth box, the
            anchors with which it has its highest IoU (so that no object goes unmatched).
            Each such anchor keeps its own best ground truth, as in torchvision/detectron2.
            Unlike them, ground truth that overlaps no anchor at all (IoU 0) adds nothing.
    """

    def __init__(self, fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.4, allow_low_quality_matches: bool = True):
        if bg_iou_thresh > fg_iou_thresh:
            raise ValueError(f"bg_iou_thresh {bg_iou_thresh} > fg_iou_thresh {fg_iou_thresh}")
        self.fg_iou_thresh = fg_iou_thresh
        self.bg_iou_thresh = bg_iou_thresh
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, anchors: Tensor, gt_boxes: Tensor, gt_valid: Tensor) -> Matches:
        """Match ``anchors (R, 4)`` to padded ground truth ``gt_boxes (N, G, 4)``.

        ``gt_valid (N, G)`` bool marks real (non-padding) boxes; ``G`` may be 0.
        """
        n, g = gt_valid.shape
        r = anchors.shape[0]
        if g == 0:
            zeros = torch.zeros(n, r, dtype=torch.int64, device=anchors.device)
            return Matches(zeros, zeros.to(torch.int8))
        # All images share the anchors, so one box_iou call covers the batch:
        # (N*G, 4) x (R, 4) -> (N*G, R) -> (N, G, R)
        iou = box_iou(gt_boxes.reshape(-1, 4).float(), anchors.float()).view(n, g, r)
        iou = iou.masked_fill(~gt_valid[:, :, None], -1.0)  # padding never wins a match
        best_iou, gt_index = iou.max(dim=1)  # (N, R)
        labels = torch.full_like(gt_index, IGNORE, dtype=torch.int8)
        labels[best_iou < self.bg_iou_thresh] = BACKGROUND
        labels[best_iou >= self.fg_iou_thresh] = FOREGROUND
        if self.allow_low_quality_matches:
            best_per_gt = iou.amax(dim=2, keepdim=True)  # (N, G, 1)
            is_best = (iou == best_per_gt) & (best_per_gt > 0)  # (N, G, R)
            labels[is_best.any(dim=1)] = FOREGROUND
        return Matches(gt_index, labels)

    def __repr__(self) -> str:
        return (
            f"Matcher(fg_iou_thresh={self.fg_iou_thresh}, bg_iou_thresh={self.bg_iou_thresh}, "
            f"allow_low_quality_matches={self.allow_low_quality_matches})"
        )
