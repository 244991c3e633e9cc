"""Crowd regions: background anchors mostly inside an ``iscrowd`` box are ignored (weight 0)."""

import torch

from focaldet.losses import RetinaNetCriterion
from focaldet.losses.criterion import anchor_crowd_ioa
from tests.test_criterion import _outputs, _targets


def test_ioa_exact_numbers():
    anchors = torch.tensor([[0, 0, 10, 10], [5, 5, 15, 15], [20, 20, 30, 30]], dtype=torch.float)
    crowd = torch.tensor([[[0, 0, 10, 20], [0, 0, 0, 0]]], dtype=torch.float)  # one crowd box + padding
    ioa = anchor_crowd_ioa(anchors, crowd)  # (1, 3, 2)
    # anchor 0 fully inside (1.0), anchor 1: 5x10 of 100 (0.5), anchor 2: none; padding 0
    assert torch.equal(ioa, torch.tensor([[[1.0, 0.0], [0.5, 0.0], [0.0, 0.0]]]))


def test_anchors_inside_crowd_are_ignored_and_not_in_loss():
    out = _outputs(1)
    boxes = torch.tensor([[[4, 4, 40, 44]]], dtype=torch.float)
    labels = torch.tensor([[0]])
    crowd = torch.tensor([[[40, 40, 64, 64]]], dtype=torch.float)
    crit = RetinaNetCriterion()
    plain, t = crit.assign(out, boxes, labels), crit.assign(out, boxes, labels, crowd)
    ioa = anchor_crowd_ioa(out["anchors"], crowd)[0, :, 0]
    expect_ignored = (ioa >= 0.5) & (plain.weight[0] == 1) & ~plain.fg[0]
    assert expect_ignored.sum() > 0
    assert torch.equal(t.weight[0] == 0, (plain.weight[0] == 0) | expect_ignored)
    assert torch.equal(t.fg, plain.fg)  # positives stay positive
    # ignored anchors do not move the loss: changing their logits changes nothing
    loss = crit(out, boxes, labels, crowd)["loss"]
    for x, a in zip(out["cls_logits"], torch.cat([expect_ignored]).split([c.shape[1] for c in out["cls_logits"]])):
        x.data[0, a] += 5.0
    assert torch.allclose(crit(out, boxes, labels, crowd)["loss"], loss)


def test_positive_under_crowd_stays_positive():
    out = _outputs(1)
    boxes = torch.tensor([[[4, 4, 40, 44]]], dtype=torch.float)
    crowd = torch.tensor([[[-200, -200, 300, 300]]], dtype=torch.float)  # covers every anchor
    t = RetinaNetCriterion().assign(out, boxes, torch.tensor([[0]]), crowd)
    assert t.fg.sum() > 0 and torch.all(t.weight[t.fg] == 1) and torch.all(t.weight[~t.fg] == 0)


def test_threshold_configurable():
    out = _outputs(1)
    boxes, labels = torch.tensor([[[4, 4, 40, 44]]], dtype=torch.float), torch.tensor([[0]])
    crowd = torch.tensor([[[40, 40, 64, 64]]], dtype=torch.float)
    lo = RetinaNetCriterion(crowd_ioa_threshold=0.1).assign(out, boxes, labels, crowd).weight
    hi = RetinaNetCriterion(crowd_ioa_threshold=0.9).assign(out, boxes, labels, crowd).weight
    assert (lo == 0).sum() > (hi == 0).sum()


def test_no_crowd_is_bit_identical():
    out = _outputs(4)
    boxes, labels = _targets()
    crit = RetinaNetCriterion()
    a = crit(out, boxes, labels)
    for crowd in (None, torch.zeros(4, 0, 4)):
        b = crit(out, boxes, labels, crowd)
        assert all(torch.equal(a[k], b[k]) for k in a)
