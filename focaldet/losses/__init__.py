"""Losses: every class loss is ``loss(logits, labels, weight) -> sum`` and every box loss
``loss(pred, target, weight=None) -> sum``, so configs swap them with ``class_path``."""

from focaldet.losses.box import GIoULoss, L1Loss, SmoothL1Loss
from focaldet.losses.criterion import RetinaNetCriterion
from focaldet.losses.focal import BinaryCrossEntropyLoss, SigmoidFocalLoss, SoftmaxFocalLoss, sigmoid_focal_loss

__all__ = [
    "BinaryCrossEntropyLoss", "GIoULoss", "L1Loss", "RetinaNetCriterion", "SigmoidFocalLoss",
    "SmoothL1Loss", "SoftmaxFocalLoss", "sigmoid_focal_loss",
]
