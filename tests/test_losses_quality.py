"""IoU-aware losses (Varifocal, Quality Focal), Poly-1 focal, DIoU / CIoU: against direct
implementations of the papers / mmdet / the PolyLoss code, in value and gradient, at
extreme logits and under autocast; the criterion's quality targets."""

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, complete_box_iou_loss, distance_box_iou_loss

from focaldet.losses import (
    CIoULoss, DIoULoss, PolyFocalLoss, QualityFocalLoss, RetinaNetCriterion, SigmoidFocalLoss, VarifocalLoss,
)

K = 5


def _data(seed=0, m=200, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(2, m // 2, K, generator=g) * scale).requires_grad_()
    labels = torch.where(torch.rand(2, m // 2, generator=g) < 0.3, torch.randint(0, K, (2, m // 2), generator=g), K)
    weight = (torch.rand(2, m // 2, generator=g) > 0.1).float()
    quality = torch.where(labels < K, torch.rand(2, m // 2, generator=g), 0.0)
    quality[0, :3] = 0.0  # positives whose box misses its gt (IoU 0), if any there
    return logits, labels, weight, quality


def _iou_targets(labels, quality):
    """(..., K) soft targets: the IoU at a positive's class, 0 elsewhere."""
    return F.one_hot(labels, K + 1)[..., :K].float() * quality.unsqueeze(-1)


def mmdet_varifocal_loss(pred, target, alpha=0.75, gamma=2.0, iou_weighted=True):
    """mmdet's varifocal_loss, elementwise (reduction 'none')."""
    pred_sigmoid = pred.sigmoid()
    target = target.type_as(pred)
    if iou_weighted:
        focal_weight = target * (target > 0.0).float() + \
            alpha * (pred_sigmoid - target).abs().pow(gamma) * (target <= 0.0).float()
    else:
        focal_weight = (target > 0.0).float() + alpha * (pred_sigmoid - target).abs().pow(gamma) * (target <= 0.0).float()
    return F.binary_cross_entropy_with_logits(pred, target, reduction="none") * focal_weight


def mmdet_quality_focal_loss(pred, label, score, beta=2.0):
    """mmdet's quality_focal_loss: (M, K) logits, labels in [0, K], scores (M,) -> (M,)."""
    pred_sigmoid = pred.sigmoid()
    scale_factor = pred_sigmoid
    zerolabel = scale_factor.new_zeros(pred.shape)
    loss = F.binary_cross_entropy_with_logits(pred, zerolabel, reduction="none") * scale_factor.pow(beta)
    bg_class_ind = pred.size(1)
    pos = ((label >= 0) & (label < bg_class_ind)).nonzero().squeeze(1)
    pos_label = label[pos].long()
    scale_factor = score[pos] - pred_sigmoid[pos, pos_label]
    loss[pos, pos_label] = F.binary_cross_entropy_with_logits(
        pred[pos, pos_label], score[pos], reduction="none") * scale_factor.abs().pow(beta)
    return loss.sum(dim=1, keepdim=False)


def paper_varifocal(pred, q, alpha=0.75, gamma=2.0):
    """VarifocalNet eq. 2 as written: q (q log p + (1 - q) log(1 - p)) / alpha p^gamma log(1 - p)."""
    p = pred.sigmoid()
    pos = -q * (q * torch.log(p) + (1 - q) * torch.log(1 - p))
    neg = -alpha * p.pow(gamma) * torch.log(1 - p)
    return torch.where(q > 0, pos, neg)


def poly1_focal_loss(logits, labels, epsilon=1.0, gamma=2.0, alpha=0.25):
    """The PolyLoss paper's appendix code (in torch)."""
    p = torch.sigmoid(logits)
    ce_loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    pt = labels * p + (1 - labels) * (1 - p)
    fl = ce_loss * ((1 - pt) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * labels + (1 - alpha) * (1 - labels)
        fl = alpha_t * fl
    return fl + epsilon * torch.pow(1 - pt, gamma + 1)


def _check(ours, ref, logits):
    (g1,) = torch.autograd.grad(ours, logits)
    (g2,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("iou_weighted", [True, False])
@pytest.mark.parametrize("alpha,gamma", [(0.75, 2.0), (0.5, 1.5)])
def test_varifocal_equals_mmdet(iou_weighted, alpha, gamma):
    logits, labels, weight, quality = _data()
    ours = VarifocalLoss(alpha, gamma, iou_weighted)(logits, labels, weight, quality)
    ref = (mmdet_varifocal_loss(logits, _iou_targets(labels, quality), alpha, gamma, iou_weighted)
           * weight[..., None]).sum()
    _check(ours, ref, logits)


def test_varifocal_equals_the_paper_formula():
    logits, labels, weight, quality = _data(scale=2.0)
    ours = VarifocalLoss()(logits, labels, weight, quality)
    ref = (paper_varifocal(logits, _iou_targets(labels, quality)) * weight[..., None]).sum()
    _check(ours, ref, logits)


@pytest.mark.parametrize("beta", [2.0, 1.0])
def test_quality_focal_equals_mmdet(beta):
    logits, labels, weight, quality = _data(1)
    ours = QualityFocalLoss(beta)(logits, labels, weight, quality)
    ref = (mmdet_quality_focal_loss(logits.reshape(-1, K), labels.reshape(-1), quality.reshape(-1), beta)
           * weight.reshape(-1)).sum()
    _check(ours, ref, logits)


def test_quality_focal_equals_the_paper_formula():
    logits, labels, weight, quality = _data(2, scale=2.0)
    y = _iou_targets(labels, quality)
    s = logits.sigmoid()
    ref = -(y - s).abs().pow(2.0) * ((1 - y) * torch.log(1 - s) + y * torch.log(s))
    _check(QualityFocalLoss()(logits, labels, weight, quality), (ref * weight[..., None]).sum(), logits)


@pytest.mark.parametrize("alpha,gamma,epsilon", [(0.25, 2.0, 1.0), (-1.0, 2.0, -1.0), (0.5, 1.0, 2.0)])
def test_poly_focal_equals_the_paper_code(alpha, gamma, epsilon):
    logits, labels, weight, _ = _data(3)
    onehot = F.one_hot(labels, K + 1)[..., :K].float()
    ref = (poly1_focal_loss(logits, onehot, epsilon, gamma, alpha) * weight[..., None]).sum()
    _check(PolyFocalLoss(alpha, gamma, epsilon)(logits, labels, weight), ref, logits)
    # epsilon 0 is the focal loss
    torch.testing.assert_close(PolyFocalLoss(alpha, gamma, 0.0)(logits, labels, weight),
                               SigmoidFocalLoss(alpha, gamma)(logits, labels, weight))


@pytest.mark.parametrize("loss", [VarifocalLoss(), QualityFocalLoss(), PolyFocalLoss()], ids=lambda l: type(l).__name__)
def test_finite_at_extreme_logits(loss):
    logits = torch.tensor([[1e4, -1e4, 0.0, 1e4, -1e4], [-1e4, 1e4, 50.0, -1e4, 1e4],
                           [1e4, 1e4, -1e4, -1e4, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 5, 1])  # positives at a +1e4 and a -1e4... logit, one background
    args = (labels, torch.ones(3)) + ((torch.tensor([0.7, 0.0, 0.3]),) if getattr(loss, "quality_targets", False) else ())
    value = loss(logits, *args)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("loss", [VarifocalLoss(), QualityFocalLoss(), PolyFocalLoss()], ids=lambda l: type(l).__name__)
def test_finite_and_fp32_under_bf16_autocast(loss):
    lin = torch.nn.Linear(8, K)
    x = torch.randn(64, 8) * 1e3
    labels = torch.randint(0, K + 1, (64,))
    extra = (torch.rand(64),) if getattr(loss, "quality_targets", False) else ()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = lin(x)
        assert logits.dtype == torch.bfloat16
        value = loss(logits, labels, torch.ones(64), *extra)
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value) and torch.isfinite(lin.weight.grad).all()


def test_quality_is_not_differentiated():
    logits, labels, weight, quality = _data()
    quality.requires_grad_()
    VarifocalLoss()(logits, labels, weight, quality).backward()
    assert quality.grad is None


def test_diou_ciou_equal_torchvision():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(20, 2, generator=g) * 50
    pred = torch.cat([xy, xy + 5 + torch.rand(20, 2, generator=g) * 30], 1)
    xy = xy + torch.randn(20, 2, generator=g) * 4
    target = torch.cat([xy, xy + 5 + torch.rand(20, 2, generator=g) * 30], 1)
    w = torch.rand(20, generator=g)
    torch.testing.assert_close(DIoULoss()(pred, target, w), (distance_box_iou_loss(pred, target) * w).sum())
    torch.testing.assert_close(CIoULoss()(pred, target), complete_box_iou_loss(pred, target, reduction="sum"))
    assert DIoULoss.decoded_boxes and CIoULoss.decoded_boxes


# ---------------------------------------------------------------- through the criterion
class _Recorder(torch.nn.Module):
    """A class loss declaring quality_targets that records what the criterion gives it."""

    background_logit, quality_targets, normalizer = False, True, "num_pos"

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, logits, labels, weight, quality):
        self.calls.append((labels, weight, quality))
        return logits.float().sum() * 0


def test_criterion_gives_the_detached_iou_of_decoded_boxes():
    from test_criterion import K as CK, _outputs, _targets

    outputs = _outputs(4)
    boxes, labels = _targets()
    rec = _Recorder()
    crit = RetinaNetCriterion(rec)
    crit(outputs, boxes, labels)
    quality = torch.cat([c[2] for c in rec.calls], 1)  # (N, R) over the levels
    assert not quality.requires_grad
    t = crit.assign(outputs, boxes, labels)
    deltas = torch.cat(outputs["box_deltas"], 1)
    decoded = crit.box_coder.decode(deltas[t.pos_image, t.pos_anchor], outputs["anchors"][t.pos_anchor])
    expected = box_iou(decoded, t.gt_boxes).diagonal()
    torch.testing.assert_close(quality[t.fg], expected.detach())
    assert (quality[~t.fg] == 0).all() and (quality[t.fg] > 0).any()
    assert torch.equal(torch.cat([c[0] for c in rec.calls], 1), t.cls_target)
    assert t.cls_target.max() == CK


def test_criterion_trains_with_vfl_and_qfl():
    from test_criterion import _outputs, _targets

    for loss in (VarifocalLoss(), QualityFocalLoss()):
        outputs = _outputs(4)
        boxes, labels = _targets()
        out = RetinaNetCriterion(loss)(outputs, boxes, labels)
        out["loss"].backward()
        assert torch.isfinite(out["loss"]) and out["loss_cls"] > 0
        assert outputs["cls_logits"][0].grad.abs().sum() > 0


@pytest.mark.parametrize("loss", [SigmoidFocalLoss(), VarifocalLoss(), QualityFocalLoss()], ids=lambda l: type(l).__name__)
def test_fused_losses_without_grad_mode(loss):
    """Validation computes losses under inference_mode / no_grad: same value, no autograd error."""
    logits, labels, weight, quality = _data()
    extra = (quality,) if getattr(loss, "quality_targets", False) else ()
    ref = loss(logits, labels, weight, *extra).detach()
    for mode in (torch.inference_mode, torch.no_grad):
        with mode():
            torch.testing.assert_close(loss(logits.detach(), labels, weight, *extra), ref)
