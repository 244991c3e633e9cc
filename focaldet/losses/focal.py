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
# The loss of every logit taken as a negative and its gradient come out of ONE elementwise
# pass over the (M, K) logits: both need sigma(x) and softplus(x), the two transcendentals
# that make this pass compute bound on CPU. The backward then only scales the gradient.
#
# Eager, on CPU, the pass walks the logits in chunks of CPU_CHUNK elements: the chunk
# temporaries stay in cache and are reused by the allocator, where full-size temporaries
# would each be a fresh allocation that page-faults (~45 ms per 125 MB here); only the
# gradient is allocated at full size. CUDA runs one chunk. With ``compile=True`` the pass
# is one ``torch.compile``-generated loop.
CPU_CHUNK = 1 << 18


def _neg_term(x: Tensor, gamma: float) -> Tensor:
    """``sigma(x)^gamma * softplus(x)``: the focal loss of logit ``x`` with target 0, without alpha."""
    sp = F.softplus(x)
    return sp if gamma == 0 else torch.sigmoid(x).pow(gamma) * sp


def _neg_grad(s: Tensor, sp: Tensor, gamma: float, s_gamma: Tensor | None = None) -> Tensor:
    """``d/dx sigma^g softplus = sigma^g * (g (1 - sigma) softplus + sigma)`` from
    ``s = sigma(x)``, ``sp = softplus(x)`` and optionally ``s_gamma = s^gamma``."""
    if gamma == 0:
        return s
    return (1 - s).mul_(sp).mul_(gamma).add_(s).mul_(s.pow(gamma) if s_gamma is None else s_gamma)


def _row_step(x: Tensor) -> int:
    """Rows of ``x (M, K)`` per chunk: about ``CPU_CHUNK`` elements on CPU, all rows elsewhere."""
    if x.device.type != "cpu":
        return max(x.shape[0], 1)
    return max(CPU_CHUNK // max(x.shape[1], 1), 1)


def _negatives(x: Tensor, alpha_neg: Tensor, weight: Tensor, gamma: float,
               with_grad: bool) -> tuple[Tensor, Tensor | None]:
    """``sum_m weight[m] * sum_k alpha_neg[k] * _neg_term(x[m, k])`` over ``x (M, K)`` and,
    if ``with_grad``, its gradient ``(M, K)``; chunk by chunk."""
    grad = torch.empty_like(x) if with_grad else None
    total = x.new_zeros(())
    step = _row_step(x)
    for i in range(0, x.shape[0], step):
        xc, wc = x[i:i + step], weight[i:i + step]
        s, sp = torch.sigmoid(xc), F.softplus(xc)
        s_gamma = s.pow(gamma) if gamma != 0 else None
        term = sp if gamma == 0 else s_gamma * sp
        total += torch.mv(term, alpha_neg).dot(wc)  # mv/dot: stay fp32 under autocast
        if with_grad:
            d = _neg_grad(s, sp, gamma, s_gamma)
            torch.mul(d.mul_(alpha_neg), wc.unsqueeze(-1), out=grad[i:i + step])
    return total, grad


def _negatives_fused(x: Tensor, alpha_neg: Tensor, weight: Tensor, gamma: float,
                     with_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Whole-tensor ``_negatives`` for ``torch.compile``: one fused loop, no temporaries."""
    s, sp = torch.sigmoid(x), F.softplus(x)
    term = sp if gamma == 0 else s.pow(gamma) * sp
    total = ((term * alpha_neg).sum(-1) * weight).sum()
    if not with_grad:
        return total, None
    d = s if gamma == 0 else s.pow(gamma) * (gamma * (1 - s) * sp + s)
    return total, d * alpha_neg * weight.unsqueeze(-1)


_compiled: dict[str, object] = {}


def _kernel(compiled: bool):
    if not compiled:
        return _negatives
    if "negatives" not in _compiled:
        _compiled["negatives"] = torch.compile(_negatives_fused, dynamic=True)
    return _compiled["negatives"]


class _SigmoidFocalSum(torch.autograd.Function):
    """``sum_m weight[m] * sum_k FL(x[m, k], target [k == labels[m]])`` over ``x (M, K)``.

    Every logit is first treated as a negative (the chunked or compiled pass above, which
    also produces the gradient when one is needed), then the P positive entries are
    corrected. The gradient is analytic and lives in a single ``(M, K)`` tensor (a separate
    autograd node for the correction would allocate and add a second, mostly-zero one).
    """

    @staticmethod
    def forward(ctx, x, labels, weight, alpha_pos, alpha_neg, gamma, compiled):
        rows = ((labels < x.shape[1]) & (weight > 0)).nonzero().squeeze(1)  # (P,) positive rows
        cls = labels[rows]
        xp = x[rows, cls]  # (P,) logit of each positive anchor's own class
        # replace the positive entries' negative term by their positive one
        correction = alpha_pos[cls] * _neg_term(-xp, gamma) - alpha_neg[cls] * _neg_term(xp, gamma)
        total, ctx.negatives_grad = _kernel(compiled)(x, alpha_neg, weight, gamma, ctx.needs_input_grad[0])
        ctx.save_for_backward(x, weight, alpha_pos, alpha_neg, rows, cls)
        ctx.gamma, ctx.compiled = gamma, compiled
        return total + (correction * weight[rows]).sum()

    @staticmethod
    def backward(ctx, grad):
        x, weight, alpha_pos, alpha_neg, rows, cls = ctx.saved_tensors
        dx, ctx.negatives_grad = ctx.negatives_grad, None  # the forward's, used once, in place
        if dx is None:  # a second backward through a retained graph: recompute it
            dx = _kernel(ctx.compiled)(x, alpha_neg, weight, ctx.gamma, True)[1]
        dx.mul_(grad)
        xp = x[rows, cls]
        pos_grad = _neg_grad(torch.sigmoid(-xp), F.softplus(-xp), ctx.gamma)  # d/dy at y = -xp
        neg_grad = _neg_grad(torch.sigmoid(xp), F.softplus(xp), ctx.gamma)
        d_correction = -alpha_pos[cls] * pos_grad - alpha_neg[cls] * neg_grad
        dx[rows, cls] += d_correction * weight[rows] * grad  # (row, class) pairs are unique
        return dx, None, None, None, None, None, None


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
        alpha_pos, alpha_neg = self._alphas(x)
        # (M, K) rows: a view of contiguous logits; labels and weight flattened alike
        return _SigmoidFocalSum.apply(x.reshape(-1, k), labels.reshape(-1), weight.float().reshape(-1),
                                      alpha_pos, alpha_neg, self.gamma, self.compile)

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
