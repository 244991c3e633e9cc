"""IoU-aware class losses, in the plain RetinaNet head: Varifocal loss (VarifocalNet,
Zhang et al., CVPR 2021) and Quality Focal loss (GFL, Li et al., NeurIPS 2020).

They declare ``quality_targets = True``, so the criterion calls them as::

    loss(logits, labels, weight, quality) -> scalar sum
    quality: (...) the DETACHED IoU of each anchor's decoded box with its matched ground
        truth on positive anchors, 0 elsewhere.

The target of a positive anchor at its ground-truth class is ``q = quality``, every other
entry's target is 0. Both run on the fused negative pass of ``SigmoidFocalLoss`` (their
negative terms are ``alpha sigma^gamma softplus`` and ``sigma^beta softplus``), with the
positive entries corrected; the default normalizer is the positive count, as in mmdet
(VFNet / GFL heads: ``avg_factor`` = positives averaged over GPUs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from focaldet.losses.focal import _DenseSum, _flat, _neg_term
from focaldet.losses.normalizer import check_normalizer


def _soft_bce(x: Tensor, q: Tensor) -> Tensor:
    """``-(q log sigma(x) + (1 - q) log(1 - sigma(x)))`` from softplus terms (finite at +-1e4)."""
    return q * F.softplus(-x) + (1 - q) * F.softplus(x)


class VarifocalLoss(nn.Module):
    """Varifocal loss (VarifocalNet, eq. 2), per logit with ``p = sigma(x)``:
    ``-q (q log p + (1 - q) log(1 - p))`` where the target ``q > 0`` (a positive anchor at
    its class, ``q`` its IoU), ``-alpha p^gamma log(1 - p)`` where ``q = 0``.

    Args:
        alpha: weight of the negative entries only (positives are weighted by ``q``); the
            paper's 0.75. Not a positive/negative balance like the focal loss's alpha.
        gamma: focusing exponent of the negatives' ``p^gamma``.
        iou_weighted: weight a positive's BCE by its target ``q`` (the paper's); ``False``
            weights it by 1, a BCE with the soft target ``q`` (mmdet's option).
        normalizer: see ``focaldet.losses.normalizer.NORMALIZERS``.

    As mmdet's ``varifocal_loss``, a positive anchor whose box has IoU 0 counts as a
    negative entry (``q = 0``).
    """

    background_logit = False
    quality_targets = True

    def __init__(self, alpha: float = 0.75, gamma: float = 2.0, iou_weighted: bool = True,
                 normalizer: str = "num_pos"):
        super().__init__()
        self.alpha, self.gamma, self.iou_weighted = float(alpha), float(gamma), iou_weighted
        self.normalizer = check_normalizer(normalizer)

    def forward(self, logits: Tensor, labels: Tensor, weight: Tensor, quality: Tensor) -> Tensor:
        """``logits (..., K)``, ``labels``, ``weight``, ``quality (...)`` -> scalar sum."""
        x, labels, weight = _flat(logits, labels, weight)
        q_all = quality.detach().float().reshape(-1)  # (M,)
        alpha_neg = torch.full((x.shape[-1],), self.alpha, device=x.device)
        alpha, gamma, iou_weighted = self.alpha, self.gamma, self.iou_weighted

        def positive(xp, rows, cls):
            q = q_all[rows]
            pos = _soft_bce(xp, q) * (q if iou_weighted else 1.0)
            return torch.where(q > 0, pos, alpha * _neg_term(xp, gamma))

        return _DenseSum.apply(x, labels, weight, alpha_neg, gamma, False, positive)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, gamma={self.gamma}, iou_weighted={self.iou_weighted}, "
                f"normalizer={self.normalizer!r}")


class QualityFocalLoss(nn.Module):
    """Quality Focal loss (GFL, eq. 5), per logit with ``sigma = sigma(x)`` and target ``y``
    (``q`` at a positive anchor's class, 0 elsewhere):
    ``-|y - sigma|^beta ((1 - y) log(1 - sigma) + y log sigma)``. No alpha: positives and
    negatives are weighted only by their distance to the target.

    Args:
        beta: modulating exponent; the paper's 2.
        normalizer: see ``focaldet.losses.normalizer.NORMALIZERS``.
    """

    background_logit = False
    quality_targets = True

    def __init__(self, beta: float = 2.0, normalizer: str = "num_pos"):
        super().__init__()
        self.beta = float(beta)
        self.normalizer = check_normalizer(normalizer)

    def forward(self, logits: Tensor, labels: Tensor, weight: Tensor, quality: Tensor) -> Tensor:
        """``logits (..., K)``, ``labels``, ``weight``, ``quality (...)`` -> scalar sum."""
        x, labels, weight = _flat(logits, labels, weight)
        q_all = quality.detach().float().reshape(-1)  # (M,)
        beta = self.beta

        def positive(xp, rows, cls):
            q = q_all[rows]
            return (q - torch.sigmoid(xp)).abs().pow(beta) * _soft_bce(xp, q)

        return _DenseSum.apply(x, labels, weight, torch.ones(x.shape[-1], device=x.device), beta, False, positive)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, normalizer={self.normalizer!r}"
