"""Box regression losses.

One contract for every box loss::

    loss(pred, target, weight=None) -> scalar sum
    pred, target: (P, 4) for the P positive anchors; weight: (P,) or None.

A loss with ``decoded_boxes = False`` is given encoded deltas ``(dx, dy, dw, dh)``; one with
``decoded_boxes = True`` is given decoded xyxy boxes in pixels (the criterion reads the
attribute; it never checks the loss's type).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import complete_box_iou_loss, distance_box_iou_loss, generalized_box_iou_loss


def _weighted_sum(per_box: Tensor, weight: Tensor | None) -> Tensor:
    return (per_box if weight is None else per_box * weight).sum()


class SmoothL1Loss(nn.Module):
    """Smooth L1 on deltas; ``beta = 0.1`` as detectron2's RetinaNet (``beta = 0`` is L1)."""

    decoded_boxes = False

    def __init__(self, beta: float = 0.1):
        super().__init__()
        self.beta = beta

    def forward(self, pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        per_box = F.smooth_l1_loss(pred.float(), target, reduction="none", beta=self.beta).sum(-1)  # (P,)
        return _weighted_sum(per_box, weight)

    def extra_repr(self) -> str:
        return f"beta={self.beta}"


class L1Loss(nn.Module):
    """L1 on deltas (torchvision's RetinaNet v1 box loss)."""

    decoded_boxes = False

    def forward(self, pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        return _weighted_sum((pred.float() - target).abs().sum(-1), weight)


class GIoULoss(nn.Module):
    """Generalised IoU loss ``1 - GIoU`` on decoded boxes (``torchvision.ops``)."""

    decoded_boxes = True

    def forward(self, pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        return _weighted_sum(generalized_box_iou_loss(pred.float(), target.float(), reduction="none"), weight)


class DIoULoss(nn.Module):
    """Distance IoU loss ``1 - IoU + d^2 / c^2`` on decoded boxes (Zheng et al., AAAI 2020;
    ``torchvision.ops.distance_box_iou_loss``)."""

    decoded_boxes = True

    def forward(self, pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        return _weighted_sum(distance_box_iou_loss(pred.float(), target.float(), reduction="none"), weight)


class CIoULoss(nn.Module):
    """Complete IoU loss: DIoU plus the aspect-ratio term ``alpha v`` on decoded boxes
    (Zheng et al., AAAI 2020; ``torchvision.ops.complete_box_iou_loss``)."""

    decoded_boxes = True

    def forward(self, pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        return _weighted_sum(complete_box_iou_loss(pred.float(), target.float(), reduction="none"), weight)
