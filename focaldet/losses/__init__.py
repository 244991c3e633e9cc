"""Losses: every class loss is ``loss(logits, labels, weight) -> sum`` (plus ``quality`` for
those declaring ``quality_targets``) and every box loss ``loss(pred, target, weight=None) -> sum``,
so configs swap them with ``class_path``."""

from focaldet.losses.box import CIoULoss, DIoULoss, GIoULoss, L1Loss, SmoothL1Loss
from focaldet.losses.criterion import RetinaNetCriterion, Targets
from focaldet.losses.focal import (
    BinaryCrossEntropyLoss, PolyFocalLoss, ProbabilityFocalLoss, SigmoidFocalLoss, SoftmaxFocalLoss,
    sigmoid_focal_loss,
)
from focaldet.losses.normalizer import NORMALIZERS
from focaldet.losses.quality import QualityFocalLoss, VarifocalLoss

__all__ = [
    "BinaryCrossEntropyLoss", "CIoULoss", "DIoULoss", "GIoULoss", "L1Loss", "NORMALIZERS", "PolyFocalLoss",
    "ProbabilityFocalLoss", "QualityFocalLoss", "RetinaNetCriterion", "SigmoidFocalLoss", "SmoothL1Loss",
    "SoftmaxFocalLoss", "Targets", "VarifocalLoss", "sigmoid_focal_loss",
]
