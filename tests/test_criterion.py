"""The criterion: batched over images, equal to a per-image reference; empty images."""

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, sigmoid_focal_loss

from focaldet.losses import GIoULoss, L1Loss, RetinaNetCriterion, SigmoidFocalLoss, SmoothL1Loss, SoftmaxFocalLoss
from focaldet.modeling import AnchorGenerator, BoxCoder

K = 3


def _outputs(n, shapes=((8, 8), (4, 4)), num_logits=K, seed=0):
    g = torch.Generator().manual_seed(seed)
    gen = AnchorGenerator(sizes=(32, 64), strides=(8, 16))
    counts = gen.num_per_level(shapes)
    return {
        "cls_logits": [torch.randn(n, c, num_logits, generator=g).requires_grad_() for c in counts],
        "box_deltas": [(torch.randn(n, c, 4, generator=g) * 0.1).requires_grad_() for c in counts],
        "anchors": gen(shapes),
    }


def _targets():
    boxes = torch.tensor([
        [[4, 4, 40, 44], [30, 10, 60, 30], [0, 0, 0, 0]],
        [[10, 10, 50, 50], [0, 0, 0, 0], [0, 0, 0, 0]],
        [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],  # no boxes
        [[2, 30, 20, 60], [25, 25, 64, 64], [33, 1, 47, 15]],
    ], dtype=torch.float)
    labels = torch.tensor([[0, 2, -1], [1, -1, -1], [-1, -1, -1], [2, 0, 1]])
    return boxes, labels


def _reference_loss(outputs, boxes, labels, beta=0.1):
    """Per-image loop as torchvision/detectron2 would write it, normalised by all positives."""
    anchors, coder = outputs["anchors"], BoxCoder()
    cls = torch.cat(outputs["cls_logits"], 1)
    deltas = torch.cat(outputs["box_deltas"], 1)
    total_cls, total_box, total_pos = 0.0, 0.0, 0
    for i in range(cls.shape[0]):
        valid = labels[i] >= 0
        gt, gl = boxes[i][valid], labels[i][valid]
        target = torch.zeros_like(cls[i])
        keep = torch.ones(len(anchors), dtype=torch.bool)
        if len(gt):
            iou = box_iou(gt, anchors)  # (G, R)
            best, idx = iou.max(0)
            fg = best >= 0.5
            keep = (best < 0.4) | fg
            highest = iou.max(1, keepdim=True).values
            low_quality = ((iou == highest) & (highest > 0)).any(0)
            fg |= low_quality
            keep |= low_quality
            target[fg, gl[idx[fg]]] = 1
            enc = coder.encode(anchors[fg], gt[idx[fg]])
            total_box = total_box + F.smooth_l1_loss(deltas[i][fg], enc, beta=beta, reduction="sum")
            total_pos += int(fg.sum())
        total_cls = total_cls + sigmoid_focal_loss(cls[i][keep], target[keep], reduction="sum")
    n = max(total_pos, 1)
    return total_cls / n, total_box / n


def test_batched_loss_equals_per_image_reference():
    outputs = _outputs(4)
    boxes, labels = _targets()
    losses = RetinaNetCriterion()(outputs, boxes, labels)
    ref_cls, ref_box = _reference_loss(outputs, boxes, labels)
    torch.testing.assert_close(losses["loss_cls"], ref_cls.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["loss_box"], ref_box.detach(), rtol=1e-5, atol=1e-6)
    # gradients too
    params = outputs["cls_logits"] + outputs["box_deltas"]
    g1 = torch.autograd.grad(losses["loss"], params)
    g2 = torch.autograd.grad(ref_cls + ref_box, params)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_image_without_boxes():
    outputs = _outputs(1)
    losses = RetinaNetCriterion()(outputs, torch.zeros(1, 0, 4), torch.zeros(1, 0, dtype=torch.long))
    assert losses["loss_box"].item() == 0.0
    assert losses["loss_cls"].item() > 0 and torch.isfinite(losses["loss_cls"])
    assert losses["num_pos"].item() == 0
    losses["loss"].backward()  # gradients reach the box head too (as zeros)
    assert outputs["box_deltas"][0].grad is not None and outputs["box_deltas"][0].grad.abs().sum() == 0


@pytest.mark.parametrize("cls_loss,box_loss", [
    (SigmoidFocalLoss(), L1Loss()), (SoftmaxFocalLoss(), SmoothL1Loss(beta=0.0)), (SigmoidFocalLoss(), GIoULoss()),
])
def test_every_loss_pair_trains(cls_loss, box_loss):
    outputs = _outputs(4, num_logits=K + int(cls_loss.background_logit))
    boxes, labels = _targets()
    losses = RetinaNetCriterion(cls_loss, box_loss)(outputs, boxes, labels)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"]) and losses["loss_box"] > 0


def test_smooth_l1_with_beta_zero_is_l1():
    outputs = _outputs(4)
    boxes, labels = _targets()
    a = RetinaNetCriterion(box_loss=SmoothL1Loss(beta=0.0))(outputs, boxes, labels)["loss_box"]
    b = RetinaNetCriterion(box_loss=L1Loss())(outputs, boxes, labels)["loss_box"]
    torch.testing.assert_close(a, b)


def test_normalizer_ema_buffer():
    crit = RetinaNetCriterion(normalizer_momentum=0.9)
    assert "normalizer" in dict(crit.named_buffers())
    boxes, labels = _targets()
    out = crit(_outputs(4), boxes, labels)
    expected = 0.9 * 100 + 0.1 * out["num_pos"]
    torch.testing.assert_close(crit.normalizer, expected)
    crit.eval()
    crit(_outputs(4), boxes, labels)
    torch.testing.assert_close(crit.normalizer, expected)  # no update outside training
