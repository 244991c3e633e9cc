"""Classification losses for dense detection: sigmoid focal loss (the paper's), its
softmax variant, the alpha-balanced cross-entropy baseline, Poly-1 focal loss, and the
clipped-probability focal loss of Keras / TensorFlow.

One contract for every class loss (so a config can swap them freely)::

    loss(logits, labels, weight) -> scalar sum
    logits: (..., C) raw scores; labels: (...) int64 in [0, K], K meaning background;
    weight: (...) float, 0 for anchors to ignore.

``C = K`` for sigmoid losses; a loss whose ``background_logit`` is True is given
``C = K + 1`` logits, the last one for background (the head sizes itself from that
attribute, never from the loss's type). The criterion divides the sum by the count the
loss's ``normalizer`` names (``focaldet.losses.normalizer``; the paper's: positives). A
loss declaring ``quality_targets = True`` is also given the IoU of each anchor's decoded
box with its ground truth (``focaldet.losses.quality``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from focaldet.losses.normalizer import check_normalizer


def _alpha_tensor(alpha: float | Sequence[float], like: Tensor) -> Tensor | float:
    return alpha if isinstance(alpha, (int, float)) else torch.as_tensor(alpha, dtype=like.dtype, device=like.device)


def _binary_alphas(alpha: float | Sequence[float], x: Tensor) -> tuple[Tensor, Tensor]:
    """``(alpha_pos, alpha_neg)``, each ``(K,)`` for logits ``x (..., K)``: ``(alpha, 1 - alpha)``
    per class; ones for a negative float ``alpha`` (no alpha weighting)."""
    k = x.shape[-1]
    if isinstance(alpha, (int, float)):
        a = torch.full((k,), float(alpha), device=x.device)
        if alpha < 0:
            return torch.ones_like(a), torch.ones_like(a)
    else:
        a = torch.as_tensor(alpha, dtype=torch.float32, device=x.device)
        if a.numel() != k:
            raise ValueError(f"per-class alpha has {a.numel()} values for {k} classes")
    return a, 1 - a


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
# gradient is allocated at full size. CUDA runs one chunk. With ``compile=True`` the same
# chunk function runs once over the whole tensor as one ``torch.compile``-generated loop.
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


def _negatives_chunk(x: Tensor, alpha_neg: Tensor, weight: Tensor, gamma: float, with_grad: bool,
                     out: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """THE negative pass: ``sum_m weight[m] * sum_k alpha_neg[k] * _neg_term(x[m, k])`` over
    ``x (M, K)`` and, if ``with_grad``, its gradient ``(M, K)`` (written into ``out`` if given)."""
    s, sp = torch.sigmoid(x), F.softplus(x)
    s_gamma = s.pow(gamma) if gamma != 0 else None
    term = sp if gamma == 0 else s_gamma * sp
    total = torch.mv(term, alpha_neg).dot(weight)  # mv/dot: stay fp32 under autocast
    if not with_grad:
        return total, None
    d = _neg_grad(s, sp, gamma, s_gamma).mul_(alpha_neg)
    return total, torch.mul(d, weight.unsqueeze(-1), out=out)


def _negatives(x: Tensor, alpha_neg: Tensor, weight: Tensor, gamma: float,
               with_grad: bool) -> tuple[Tensor, Tensor | None]:
    """``_negatives_chunk`` over ``x (M, K)``, chunk by chunk (see above)."""
    step = _row_step(x)
    if step >= x.shape[0]:
        return _negatives_chunk(x, alpha_neg, weight, gamma, with_grad)
    grad = torch.empty_like(x) if with_grad else None
    total = x.new_zeros(())
    for i in range(0, x.shape[0], step):
        out = grad[i:i + step] if with_grad else None
        total += _negatives_chunk(x[i:i + step], alpha_neg, weight[i:i + step], gamma, with_grad, out)[0]
    return total, grad


_compiled: dict[str, object] = {}


def _kernel(compiled: bool):
    if not compiled:
        return _negatives
    if "negatives" not in _compiled:
        _compiled["negatives"] = torch.compile(_negatives_chunk, dynamic=True)
    return _compiled["negatives"]


class _DenseSum(torch.autograd.Function):
    """``sum_m weight[m] * (sum_k alpha_neg[k] * _neg_term(x[m, k]) + correction at k = labels[m])``
    over ``x (M, K)``: every logit treated as a negative, then the P positive entries corrected.

    The negatives (value and gradient) come from the fused pass above. The correction is
    ``positive(xp, rows, cls) - alpha_neg[cls] * _neg_term(xp)`` with ``xp (P,)`` the logit
    of each positive anchor's own class; ``positive`` is differentiated by autograd on
    those P values only. The gradient lives in a single ``(M, K)`` tensor (a separate
    autograd node for the correction would allocate and add a second, mostly-zero one).
    """

    @staticmethod
    def forward(ctx, x, labels, weight, alpha_neg, gamma, compiled, positive):
        rows = ((labels < x.shape[1]) & (weight > 0)).nonzero().squeeze(1)  # (P,) positive rows
        cls = labels[rows]
        with_grad = ctx.needs_input_grad[0]
        with torch.enable_grad() if with_grad else contextlib.nullcontext():
            xp = x[rows, cls].detach().requires_grad_(with_grad)  # (P,)
            correction = ((positive(xp, rows, cls) - alpha_neg[cls] * _neg_term(xp, gamma)) * weight[rows]).sum()
            d_correction = torch.autograd.grad(correction, xp)[0] if with_grad else None
        total, ctx.negatives_grad = _kernel(compiled)(x, alpha_neg, weight, gamma, with_grad)
        ctx.save_for_backward(x, weight, alpha_neg, rows, cls, d_correction)
        ctx.gamma, ctx.compiled = gamma, compiled
        return total + correction.detach()

    @staticmethod
    def backward(ctx, grad):
        x, weight, alpha_neg, rows, cls, d_correction = ctx.saved_tensors
        dx, ctx.negatives_grad = ctx.negatives_grad, None  # the forward's, used once, in place
        if dx is None:  # a second backward through a retained graph: recompute it
            dx = _kernel(ctx.compiled)(x, alpha_neg, weight, ctx.gamma, True)[1]
        dx.mul_(grad)
        dx[rows, cls] += d_correction * grad  # (row, class) pairs are unique
        return dx, None, None, None, None, None, None


def _flat(logits: Tensor, labels: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(..., K)`` logits, ``(...)`` labels and weight -> ``(M, K)``, ``(M,)``, ``(M,)`` fp32 rows
    (a view of contiguous logits)."""
    x = logits.float()
    return x.reshape(-1, x.shape[-1]), labels.reshape(-1), weight.float().reshape(-1)


class SigmoidFocalLoss(nn.Module):
    """Sigmoid focal loss over all anchors and classes (the paper's loss, eq. 5):
    ``FL = -alpha_t (1 - p_t)^gamma log(p_t)`` summed over every anchor and every class.

    Computed as: every logit treated as a negative (one fused elementwise pass over the
    ``(N, R, K)`` logits, no one-hot targets), plus a correction at the few positive
    entries. Equal to ``sigmoid_focal_loss(logits, one_hot(labels)) * weight`` summed.

    Args:
        alpha: ``alpha_t`` is ``alpha`` for the one positive entry (anchor, its class) and
            ``1 - alpha`` for every negative entry (the other classes of that anchor and
            every class of a background anchor). A float, or one value per class (``K``
            values: class k's positives get ``alpha[k]``, its negatives ``1 - alpha[k]``);
            a negative float disables alpha weighting (``alpha_t = 1``).
        gamma: focusing parameter; 0 gives alpha-balanced cross-entropy.
        compile: run the elementwise pass through ``torch.compile`` (one fused loop; the
            first call compiles for ~20 s on CPU).
        normalizer: what the criterion divides the summed loss by (``NORMALIZERS`` in
            ``focaldet.losses.criterion``); ``"num_pos"`` is the paper's.
    """

    background_logit = False

    def __init__(self, alpha: float | list[float] = 0.25, gamma: float = 2.0, compile: bool = False,
                 normalizer: str = "num_pos"):
        super().__init__()
        self.alpha, self.gamma, self.compile = alpha, float(gamma), compile
        self.normalizer = check_normalizer(normalizer)

    def _alphas(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha_pos, alpha_neg)``, each ``(K,)``."""
        return _binary_alphas(self.alpha, x)

    def forward(self, logits: Tensor, labels: Tensor, weight: Tensor) -> Tensor:
        """``logits (..., K)``, ``labels (...)`` in [0, K], ``weight (...)`` -> scalar sum."""
        x, labels, weight = _flat(logits, labels, weight)
        alpha_pos, alpha_neg = self._alphas(x)
        gamma = self.gamma

        def positive(xp, rows, cls):  # FL of a target-1 logit: alpha * sigma(-x)^gamma softplus(-x)
            return alpha_pos[cls] * _neg_term(-xp, gamma)

        return _DenseSum.apply(x, labels, weight, alpha_neg, gamma, self.compile, positive)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, compile={self.compile}, normalizer={self.normalizer!r}"


class BinaryCrossEntropyLoss(SigmoidFocalLoss):
    """alpha-balanced binary cross-entropy: the paper's baseline (focal loss with gamma = 0).
    ``alpha`` as in ``SigmoidFocalLoss``; the paper's best for it is 0.75 (Table 1a)."""

    def __init__(self, alpha: float | list[float] = 0.75, compile: bool = False, normalizer: str = "num_pos"):
        super().__init__(alpha=alpha, gamma=0.0, compile=compile, normalizer=normalizer)


class SoftmaxFocalLoss(nn.Module):
    """Softmax focal loss over ``K + 1`` logits (the last is background):
    ``-alpha_t (1 - p_t)^gamma log p_t`` with ``p_t`` the softmax probability of the
    anchor's class (one term per anchor).

    Args:
        alpha: a float: ``alpha_t = alpha`` for anchors of an object class and
            ``background_alpha`` for background anchors; a negative float disables alpha
            weighting. Or one value per logit (``K + 1`` values, the last for background):
            ``alpha_t = alpha[label]``, the per-class alpha-balanced softmax cross-entropy of
            the literature with ``gamma = 0``.
        gamma: focusing parameter; 0 gives (alpha-balanced) softmax cross-entropy.
        background_alpha: ``alpha_t`` of background anchors for a float ``alpha``; default
            ``1 - alpha``. ``background_alpha = alpha`` weights every anchor alike (the
            tutorials' one alpha for all classes).
        normalizer: see ``focaldet.losses.normalizer.NORMALIZERS``.
    """

    background_logit = True

    def __init__(self, alpha: float | list[float] = 0.25, gamma: float = 2.0,
                 background_alpha: float | None = None, normalizer: str = "num_pos"):
        super().__init__()
        self.alpha, self.gamma, self.background_alpha = alpha, float(gamma), background_alpha
        self.normalizer = check_normalizer(normalizer)

    def sample_weight(self, labels: Tensor, num_logits: int) -> Tensor:
        """``alpha_t`` of each anchor, ``(...)`` from ``labels (...)`` in [0, K]; ones without alpha."""
        if not isinstance(self.alpha, (int, float)):
            a = torch.as_tensor(self.alpha, dtype=torch.float32, device=labels.device)
            if a.numel() != num_logits:
                raise ValueError(f"SoftmaxFocalLoss: per-logit alpha has {a.numel()} values for {num_logits} "
                                 f"logits (K + 1 = {num_logits}: one per class, the last for background)")
            return a[labels]
        if self.alpha < 0:
            return torch.ones(labels.shape, device=labels.device)
        bg = 1 - self.alpha if self.background_alpha is None else self.background_alpha
        return torch.where(labels == num_logits - 1, float(bg), float(self.alpha))

    def forward(self, logits: Tensor, labels: Tensor, weight: Tensor) -> Tensor:
        """``logits (..., K+1)``, ``labels (...)`` in [0, K], ``weight (...)`` -> scalar sum."""
        log_p = logits.float().log_softmax(-1)  # (..., K+1)
        log_pt = log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (...)
        loss = -log_pt if self.gamma == 0 else -((1 - log_pt.exp()) ** self.gamma) * log_pt
        return (self.sample_weight(labels, logits.shape[-1]) * loss * weight).sum()

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, gamma={self.gamma}, background_alpha={self.background_alpha}, "
                f"normalizer={self.normalizer!r}")


class _DenseFocal(nn.Module):
    """A sigmoid focal-type loss written densely over one-hot targets (research variants,
    not the fused kernel): subclasses give the elementwise loss ``_elementwise(x, t)``."""

    background_logit = False

    def __init__(self, alpha: float | list[float], gamma: float, epsilon: float, normalizer: str):
        super().__init__()
        self.alpha, self.gamma, self.epsilon = alpha, float(gamma), float(epsilon)
        self.normalizer = check_normalizer(normalizer)

    def _elementwise(self, x: Tensor, t: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, logits: Tensor, labels: Tensor, weight: Tensor) -> Tensor:
        """``logits (..., K)``, ``labels (...)`` in [0, K], ``weight (...)`` -> scalar sum."""
        x = logits.float()
        t = F.one_hot(labels, x.shape[-1] + 1)[..., :-1].to(x.dtype)  # (..., K); label K: all zeros
        return (self._elementwise(x, t).sum(-1) * weight.float()).sum()

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, epsilon={self.epsilon}, normalizer={self.normalizer!r}"


class PolyFocalLoss(_DenseFocal):
    """Poly-1 focal loss (Leng et al., PolyLoss, ICLR 2022, eq. 5 / appendix code):
    ``FL + epsilon (1 - p_t)^(gamma + 1)`` per logit, summed.

    Args:
        alpha: as in ``SigmoidFocalLoss``; it weights the focal term only: the paper's code
            adds ``epsilon * (1 - p_t)^(gamma + 1)`` after ``FL = alpha_t * FL``.
        gamma: focusing parameter of both terms.
        epsilon: coefficient of the first polynomial term (0 gives ``SigmoidFocalLoss``).
        normalizer: see ``focaldet.losses.normalizer.NORMALIZERS``.
    """

    def __init__(self, alpha: float | list[float] = 0.25, gamma: float = 2.0, epsilon: float = 1.0,
                 normalizer: str = "num_pos"):
        super().__init__(alpha, gamma, epsilon, normalizer)

    def _elementwise(self, x: Tensor, t: Tensor) -> Tensor:
        p = torch.sigmoid(x)
        one_minus_pt = p * (1 - t) + (1 - p) * t
        return sigmoid_focal_loss(x, t, self.alpha, self.gamma) + self.epsilon * one_minus_pt.pow(self.gamma + 1)


class ProbabilityFocalLoss(_DenseFocal):
    """Binary focal loss computed from clipped probabilities, as Keras and TensorFlow
    write it: ``p = clip(sigmoid(x), eps, 1 - eps)``,
    ``ce = -(t log(p + eps) + (1 - t) log(1 - p + eps))`` (Keras 2's backend
    ``binary_crossentropy``), times ``(1 - p_t)^gamma`` with the UNclipped ``p_t`` and
    ``alpha_t``. With ``alpha < 0`` it is Keras' ``BinaryFocalCrossentropy`` (default
    ``apply_class_balancing=False``); with ``alpha = 0.25`` TensorFlow-addons'
    ``sigmoid_focal_crossentropy``. Their reductions are normalizers: Keras' mean over
    every element is ``"num_logits"``, tfa's per-sample sum then mean ``"num_samples"``.

    Unlike ``SigmoidFocalLoss`` the clipping bounds the loss of a logit at ``-log(2 eps)``
    and zeroes its gradient beyond ``|x| ~ 16``: use it to reproduce those numbers.

    Args:
        alpha: as in ``SigmoidFocalLoss`` (negative: no alpha weighting).
        gamma: focusing parameter.
        epsilon: clipping epsilon (Keras' ``backend.epsilon()``, 1e-7).
        normalizer: see ``focaldet.losses.normalizer.NORMALIZERS``.
    """

    def __init__(self, alpha: float | list[float] = 0.25, gamma: float = 2.0, epsilon: float = 1e-7,
                 normalizer: str = "num_pos"):
        super().__init__(alpha, gamma, epsilon, normalizer)

    def _elementwise(self, x: Tensor, t: Tensor) -> Tensor:
        p = torch.sigmoid(x)
        eps = self.epsilon
        pc = p.clamp(eps, 1 - eps)
        ce = -(t * torch.log(pc + eps) + (1 - t) * torch.log(1 - pc + eps))
        p_t = t * p + (1 - t) * (1 - p)
        loss = (1 - p_t).pow(self.gamma) * ce
        a = _alpha_tensor(self.alpha, x)
        if isinstance(a, Tensor) or a >= 0:
            loss = (t * a + (1 - t) * (1 - a)) * loss
        return loss
