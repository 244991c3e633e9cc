"""Classification losses for dense detection: sigmoid focal loss (the paper's), its
softmax variant, and the alpha-balanced cross-entropy baseline.

One contract for every class loss (so a config can swap them freely)::

    loss(logits, labels, weight) -> scalar sum
    logits: (..., C) raw scores; labels: (...) int64 in [0, K], K meaning background;
    weight: (...) float, 0 for anchors to ignore.

``C = K`` for sigmoid losses; a loss whose ``background_logit`` is True is given
``C = K + 1`` logits, the last one for background (the head sizes itself from that
attribute, never from the loss's type). The criterion divides by the number of positives.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _alpha_tensor(alpha: float | Sequence[float], like: Tensor) -> Tensor | float:
    return alpha if isinstance(alpha, (int, float)) else torch.as_tensor(alpha, dtype=like.dtype, device=like.device)


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float | Sequence[float] = 0.25,
                       gamma: float = 2.0, reduction: str = "none") -> Tensor:
    """Sigmoid focal loss ``FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t)`` (Lin et al., 2017).

    Same semantics as ``torchvision.ops.sigmoid_focal_loss`` (soft targets allowed,
    ``alpha < 0`` disables the alpha weighting), computed in fp32 from log-sigmoid terms so
    that it stays finite, with finite gradients, for logits of +-1e4 and under fp16/bf16
    autocast. ``alpha`` may be a per-class sequence over the last dimension.

    Args:
        logits: ``(..., K)`` raw scores. targets: same shape, in [0, 1].
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.
    """
    x, t = logits.float(), targets.float()
    log_p, log_1mp = F.logsigmoid(x), F.logsigmoid(-x)
    ce = -(t * log_p + (1 - t) * log_1mp)
    p = torch.sigmoid(x)
    loss = ce if gamma == 0 else ce * (p * (1 - t) + (1 - p) * t) ** gamma  # (1 - p_t)^gamma
    a = _alpha_tensor(alpha, x)
    if isinstance(a, Tensor) or a >= 0:
        loss = (a * t + (1 - a) * (1 - t)) * loss
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    raise ValueError(f"invalid reduction {reduction!r}: expected 'none', 'mean' or 'sum'")


# --------------------------------------------------------------------------- fused kernel
def _neg_term(x: Tensor, gamma: float) -> Tensor:
    """``sigma(x)^gamma * softplus(x)``: the focal loss of logit ``x`` with target 0, without alpha."""
    sp = F.softplus(x)
    return sp if gamma == 0 else torch.sigmoid(x).pow(gamma) * sp


def _neg_forward(x: Tensor, alpha_neg: Tensor, weight: Tensor, gamma: float) -> Tensor:
    return ((_neg_term(x, gamma) * alpha_neg).sum(-1) * weight).sum()


def _neg_backward(x: Tensor, alpha_neg: Tensor, weight: Tensor, grad: Tensor, gamma: float) -> Tensor:
    # d/dx sigma^g softplus = sigma^g * (g (1 - sigma) softplus + sigma)
    s = torch.sigmoid(x)
    dx = s if gamma == 0 else s.pow(gamma) * (gamma * (1 - s) * F.softplus(x) + s)
    return dx * alpha_neg * (weight * grad).unsqueeze(-1)


_compiled: dict[str, object] = {}


def _kernels(compiled: bool):
    if not compiled:
        return _neg_forward, _neg_backward
    if not _compiled:  # one fused loop each for forward and backward
        _compiled["f"] = torch.compile(_neg_forward, dynamic=True)
        _compiled["b"] = torch.compile(_neg_backward, dynamic=True)
    return _compiled["f"], _compiled["b"]


class _FocalNegativeSum(torch.autograd.Function):
    """``sum_{n,r} weight[n,r] * sum_k alpha_neg[k] * sigma(x)^gamma softplus(x)`` over
    ``x (N, R, K)`` with an analytic gradient: saves only ``x``, recomputes the rest."""

    @staticmethod
    def forward(ctx, x, alpha_neg, weight, gamma, compiled):
        fwd, _ = _kernels(compiled)
        ctx.save_for_backward(x, alpha_neg, weight)
        ctx.gamma, ctx.compiled = gamma, compiled
        return fwd(x, alpha_neg, weight, gamma)

    @staticmethod
    def backward(ctx, grad):
        x, alpha_neg, weight = ctx.saved_tensors
        _, bwd = _kernels(ctx.compiled)
        return bwd(x, alpha_neg, weight, grad, ctx.gamma), None, None, None, None


class SigmoidFocalLoss(nn.Module):
    """Sigmoid focal loss over all anchors and classes (the paper's loss).

    Computed as: every logit treated as a negative (one fused elementwise pass over the
    ``(N, R, K)`` logits, no one-hot targets), plus a correction at the few positive
    entries. Equal to ``sigmoid_focal_loss(logits, one_hot(labels)) * weight`` summed.

    Args:
        alpha: weight of positives (negatives get ``1 - alpha``); a float, or one value per
            class; a negative float disables alpha weighting.
        gamma: focusing parameter; 0 gives alpha-balanced cross-entropy.
        compile: run the elementwise pass through ``torch.compile`` (one fused loop; the
            first call compiles for ~20 s on CPU).
    """

    background_logit = False

    def __init__(self, alpha: float | list[float] = 0.25, gamma: float = 2.0, compile: bool = False):
        super().__init__()
        self.alpha, self.gamma, self.compile = alpha, float(gamma), compile

    def _alphas(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha_pos, alpha_neg)``, each ``(K,)``."""
        k = x.shape[-1]
        if isinstance(self.alpha, (int, float)):
            a = torch.full((k,), float(self.alpha), device=x.device)
            if self.alpha < 0:
                return torch.ones_like(a), torch.ones_like(a)
        else:
            a = torch.as_tensor(self.alpha, dtype=torch.float32, device=x.device)
            if a.numel() != k:
                raise ValueError(f"per-class alpha has {a.numel()} values for {k} classes")
        return a, 1 - a

    def forward(self, logits: Tensor, labels: Tensor, weight: Tensor) -> Tensor:
        """``logits (..., K)``, ``labels (...)`` in [0, K], ``weight (...)`` -> scalar sum."""
        x = logits.float()
        k = x.shape[-1]
        x3 = x.reshape(-1, 1, k) if x.dim() == 2 else x.reshape(x.shape[0], -1, k)  # (N, R, K)
        w = weight.float().reshape(x3.shape[:2])
        alpha_pos, alpha_neg = self._alphas(x)
        loss = _FocalNegativeSum.apply(x3, alpha_neg, w, self.gamma, self.compile)
        # Correct the positive entries: replace their negative-term by the positive one.
        pos = (labels < k) & (weight > 0)
        idx = pos.nonzero(as_tuple=True)
        cls = labels[idx]
        xp = x[idx + (cls,)]  # (P,) logit of each positive anchor's own class
        wp = weight[idx].float()
        correction = alpha_pos[cls] * _neg_term(-xp, self.gamma) - alpha_neg[cls] * _neg_term(xp, self.gamma)
        return loss + (correction * wp).sum()

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, compile={self.compile}"


class BinaryCrossEntropyLoss(SigmoidFocalLoss):
    """alpha-balanced binary cross-entropy: the paper's baseline (focal loss with gamma = 0).
    The paper's best alpha for it is 0.75 (Table 1a)."""

    def __init__(self, alpha: float | list[float] = 0.75, compile: bool = False):
        super().__init__(alpha=alpha, gamma=0.0, compile=compile)


class SoftmaxFocalLoss(nn.Module):
    """Softmax focal loss over ``K + 1`` logits (the last is background):
    ``-alpha_t (1 - p_t)^gamma log p_t`` with ``p_t`` the softmax probability of the
    anchor's class; ``alpha_t = alpha`` for objects, ``1 - alpha`` for background."""

    background_logit = True

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0):
        super().__init__()
        self.alpha, self.gamma = alpha, float(gamma)

    def forward(self, logits: Tensor, labels: Tensor, weight: Tensor) -> Tensor:
        """``logits (..., K+1)``, ``labels (...)`` in [0, K], ``weight (...)`` -> scalar sum."""
        log_p = logits.float().log_softmax(-1)  # (..., K+1)
        log_pt = log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (...)
        loss = -log_pt if self.gamma == 0 else -((1 - log_pt.exp()) ** self.gamma) * log_pt
        if self.alpha >= 0:
            is_bg = labels == logits.shape[-1] - 1
            loss = torch.where(is_bg, 1 - self.alpha, self.alpha) * loss
        return (loss * weight).sum()

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}"
