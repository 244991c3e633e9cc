"""Focal loss: the paper's numbers, torchvision's semantics, stability, and the fused module."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss as tv_focal

from focaldet.losses import BinaryCrossEntropyLoss, SigmoidFocalLoss, SoftmaxFocalLoss, sigmoid_focal_loss


def _logit(p):
    return torch.tensor([math.log(p / (1 - p))])


def test_worked_example_of_the_focal_loss_literature():
    """gamma=2, no alpha: an easy example (p=0.8) loses 25x more weight than a hard one (p=0.4)."""
    one = torch.ones(1)
    ce_easy = sigmoid_focal_loss(_logit(0.8), one, alpha=-1, gamma=0).item()
    fl_easy = sigmoid_focal_loss(_logit(0.8), one, alpha=-1, gamma=2).item()
    ce_hard = sigmoid_focal_loss(_logit(0.4), one, alpha=-1, gamma=0).item()
    fl_hard = sigmoid_focal_loss(_logit(0.4), one, alpha=-1, gamma=2).item()
    assert ce_easy == pytest.approx(0.2231, abs=1e-4)
    assert fl_easy == pytest.approx(0.0089, abs=1e-4)
    assert ce_hard == pytest.approx(0.9163, abs=1e-4)
    assert fl_hard == pytest.approx(0.3299, abs=1e-4)
    assert fl_hard / fl_easy == pytest.approx(36.96, abs=0.01)
    assert ce_hard / ce_easy == pytest.approx(4.11, abs=0.01)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1, 2.0), (0.5, 0.0), (0.75, 1.5)])
def test_equals_torchvision(reduction, soft, alpha, gamma):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 7, generator=g) * 4
    targets = torch.rand(64, 7, generator=g) if soft else (torch.rand(64, 7, generator=g) > 0.8).float()
    ours = sigmoid_focal_loss(logits, targets, alpha, gamma, reduction)
    ref = tv_focal(logits, targets, alpha, gamma, reduction)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)


def test_per_class_alpha():
    logits = torch.randn(10, 3)
    targets = (torch.rand(10, 3) > 0.5).float()
    alpha = [0.1, 0.5, 0.9]
    ours = sigmoid_focal_loss(logits, targets, alpha)
    for k, a in enumerate(alpha):
        torch.testing.assert_close(ours[:, k], tv_focal(logits[:, k], targets[:, k], a, 2.0))


@pytest.mark.parametrize("fn", ["functional", "module", "bce", "softmax"])
def test_finite_at_extreme_logits(fn):
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 50.0]], requires_grad=True)
    labels = torch.tensor([0, 3])  # one positive for class 0, one background
    weight = torch.ones(2)
    if fn == "functional":
        loss = sigmoid_focal_loss(logits, F.one_hot(labels, 4)[:, :3].float(), reduction="sum")
    elif fn == "module":
        loss = SigmoidFocalLoss()(logits, labels, weight)
    elif fn == "bce":
        loss = BinaryCrossEntropyLoss()(logits, labels, weight)
    else:
        loss = SoftmaxFocalLoss()(torch.cat([logits, torch.zeros(2, 1)], 1), labels, weight)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_finite_under_autocast(dtype):
    lin = torch.nn.Linear(8, 5)
    x = torch.randn(32, 8) * 1e3
    labels = torch.randint(0, 6, (32,))
    with torch.autocast("cpu", dtype=dtype):
        logits = lin(x)
        loss = SigmoidFocalLoss()(logits, labels, torch.ones(32))
        loss_f = sigmoid_focal_loss(logits, F.one_hot(labels, 6)[:, :5].to(logits.dtype), reduction="sum")
    (loss + loss_f).backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(loss_f)
    assert torch.isfinite(lin.weight.grad).all()


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), ([0.2, 0.3, 0.4, 0.5], 2.0), (-1.0, 1.0), (0.75, 0.0)])
def test_fused_module_equals_dense_reference(alpha, gamma):
    """SigmoidFocalLoss (negatives + positive correction, analytic gradient) equals the dense
    one-hot formulation in value and gradient."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 50, 4, generator=g) * 3).requires_grad_()
    labels = torch.randint(0, 5, (2, 50), generator=g)  # 4 == background
    weight = (torch.rand(2, 50, generator=g) > 0.2).float()
    ours = SigmoidFocalLoss(alpha, gamma)(logits, labels, weight)
    (g1,) = torch.autograd.grad(ours, logits)
    targets = F.one_hot(labels, 5)[..., :4].float()
    ref = (sigmoid_focal_loss(logits, targets, alpha, gamma) * weight[..., None]).sum()
    (g2,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)


def test_bce_is_focal_with_gamma_zero():
    logits, labels, w = torch.randn(30, 3), torch.randint(0, 4, (30,)), torch.ones(30)
    torch.testing.assert_close(BinaryCrossEntropyLoss(alpha=0.75)(logits, labels, w),
                               SigmoidFocalLoss(alpha=0.75, gamma=0)(logits, labels, w))
    ref = F.binary_cross_entropy_with_logits(logits, F.one_hot(labels, 4)[:, :3].float(), reduction="none")
    ref = ref * torch.where(F.one_hot(labels, 4)[:, :3].bool(), 0.75, 0.25)
    torch.testing.assert_close(BinaryCrossEntropyLoss(alpha=0.75)(logits, labels, w), ref.sum())


def test_softmax_focal_reduces_to_cross_entropy():
    logits, labels = torch.randn(40, 5), torch.randint(0, 5, (40,))
    ours = SoftmaxFocalLoss(alpha=-1, gamma=0)(logits, labels, torch.ones(40))
    torch.testing.assert_close(ours, F.cross_entropy(logits, labels, reduction="sum"))
    assert SoftmaxFocalLoss.background_logit and not SigmoidFocalLoss.background_logit


@pytest.mark.parametrize("chunk", [None, 7])
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), ([0.1, 0.3, 0.5, 0.7, 0.9], 2.0), (0.25, 0.0)])
def test_fused_kernel_gradient_equals_autograd_of_the_direct_formula(monkeypatch, chunk, alpha, gamma):
    """The fused pass's hand-written gradient (negatives for every logit, corrected at the
    positive entries) against autograd of the direct one-hot formula: a positive at
    every class, background and ignored rows, logits of +-1e4, +-50 and 0; also walked in
    chunks of a few rows (``CPU_CHUNK``)."""
    import focaldet.losses.focal as focal

    if chunk is not None:
        monkeypatch.setattr(focal, "CPU_CHUNK", chunk)  # 7 elements: one row per chunk
    k = 5
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4 * k, k, generator=g) * 3
    x[0], x[1], x[2, :3] = 1e4, -1e4, torch.tensor([50.0, -50.0, 0.0])
    x[3, ::2], x[3, 1::2] = 1e4, -1e4
    labels = torch.cat([torch.arange(k), torch.arange(k), torch.full((2 * k,), k)])  # every class twice, background
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    labels[:4] = torch.tensor([0, k - 1, 2, k])  # the extreme rows: positives at both ends and background
    weight = torch.ones(4 * k)
    weight[-2:] = 0  # ignored
    x = x.requires_grad_()
    ours = SigmoidFocalLoss(alpha, gamma)(x, labels, weight)
    (g_ours,) = torch.autograd.grad(ours * 0.37, x)
    ref = (sigmoid_focal_loss(x, F.one_hot(labels, k + 1)[:, :k].float(), alpha, gamma) * weight[:, None]).sum()
    (g_ref,) = torch.autograd.grad(ref * 0.37, x)
    assert torch.isfinite(g_ours).all()
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_ours, g_ref, rtol=0, atol=1e-6)
