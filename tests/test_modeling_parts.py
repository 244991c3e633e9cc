"""Anchors, matcher, box coder and head: each part on its own."""

import math

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from focaldet.modeling import AnchorGenerator, BoxCoder, Matcher, RetinaNetHead, prior_bias
from focaldet.modeling.matcher import BACKGROUND, FOREGROUND, IGNORE


# ----------------------------------------------------------------------------- anchors
def test_anchor_count_per_level():
    gen = AnchorGenerator()
    shapes = gen.feature_shapes(256, 384)
    assert shapes == [(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)]
    anchors = gen(shapes)
    assert gen.num_per_level(shapes) == [h * w * 9 for h, w in shapes]
    assert anchors.shape == (sum(h * w * 9 for h, w in shapes), 4)


def test_known_p3_anchors():
    """P3 (stride 8): the 9 anchors of the cell at (row 1, col 2) are centred at (16, 8),
    sides 32 * 2^(k/3) with h/w in {1/2, 1, 2}; area is preserved across ratios."""
    gen = AnchorGenerator()
    anchors = gen([(4, 4), (2, 2), (1, 1), (1, 1), (1, 1)])
    cell = anchors[(1 * 4 + 2) * 9:(1 * 4 + 3) * 9]  # (H, W, A) layout
    centres = (cell[:, :2] + cell[:, 2:]) / 2
    torch.testing.assert_close(centres, torch.tensor([[16.0, 8.0]]).expand(9, 2))
    wh = cell[:, 2:] - cell[:, :2]
    areas = (wh[:, 0] * wh[:, 1]).view(3, 3)  # (ratios, scales)
    expected = torch.tensor([32.0 * 2 ** (k / 3) for k in range(3)]) ** 2
    torch.testing.assert_close(areas, expected.expand(3, 3), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(wh[3], torch.tensor([32.0, 32.0]))  # ratio 1, scale 1
    torch.testing.assert_close(wh[0, 1] / wh[0, 0], torch.tensor(0.5))  # h/w = 1/2


def test_torchvision_compat_anchors_equal_torchvision():
    sizes = tuple((x, int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3))) for x in [32, 64, 128, 256, 512])
    tv = TVAnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
    ours = AnchorGenerator(torchvision_compat=True)
    for h, w in [(256, 384), (224, 320)]:  # 224x320: P6/P7 strides are not 64/128 in torchvision
        shapes = [(math.ceil(h / s), math.ceil(w / s)) for s in (8, 16, 32, 64, 128)]
        feats = [torch.zeros(1, 1, *s) for s in shapes]
        ref = tv(ImageList(torch.zeros(1, 3, h, w), [(h, w)]), feats)[0]
        torch.testing.assert_close(ours(shapes, image_size=(h, w)), ref)


def test_anchor_cache_reuses_tensors():
    gen = AnchorGenerator()
    shapes = gen.feature_shapes(128, 128)
    assert gen(shapes) is gen(shapes)
    assert gen.grids(shapes) is gen.grids(shapes)
    anchors, grids = gen.anchors_and_grids(shapes)  # the model's one lookup per forward
    assert anchors is gen(shapes) and grids is gen.grids(shapes)


def test_anchor_grids_hold_the_flat_anchors():
    gen = AnchorGenerator(offset=0.5)
    shapes = gen.feature_shapes(96, 160)
    grids = gen.grids(shapes)
    assert [len(g) for g in grids] == gen.num_per_level(shapes)
    assert torch.equal(torch.cat([g.anchors() for g in grids]), gen(shapes))
    # anchor (y, x, a) of P4 is cell[a] shifted to the centre of grid cell (y, x)
    g, (y, x, a) = grids[1], (2, 3, 4)
    row = (y * len(g.xs) + x) * len(g.cell) + a
    expected = g.cell[a] + torch.tensor([(x + 0.5) * 16, (y + 0.5) * 16] * 2)
    assert torch.equal(gen(shapes)[len(grids[0]) + row], expected)


def test_matcher_rejects_grids_of_other_anchors():
    gen = AnchorGenerator()
    gt = torch.tensor([[[0, 0, 10, 10]]], dtype=torch.float)
    with pytest.raises(ValueError, match="anchor grids hold"):
        Matcher()(ANCHORS, gt, torch.ones(1, 1, dtype=torch.bool), grids=gen.grids(gen.feature_shapes(64, 64)))


# ----------------------------------------------------------------------------- matcher
ANCHORS = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 8], [20, 20, 30, 30], [50, 50, 60, 60]], dtype=torch.float)


def test_matcher_thresholds_and_ignore_band():
    gt = torch.tensor([[[0, 0, 10, 10]]], dtype=torch.float)  # IoU with anchors: 1, 0.8, 0, 0
    m = Matcher(allow_low_quality_matches=False)(ANCHORS, gt, torch.ones(1, 1, dtype=torch.bool))
    assert m.labels.tolist() == [[FOREGROUND, FOREGROUND, BACKGROUND, BACKGROUND]]
    gt = torch.tensor([[[0, 0, 10, 4.5]]])  # IoU 0.45 with anchor 0, 0.5625 with anchor 1
    m = Matcher(allow_low_quality_matches=False)(ANCHORS, gt, torch.ones(1, 1, dtype=torch.bool))
    assert m.labels.tolist() == [[IGNORE, FOREGROUND, BACKGROUND, BACKGROUND]]


def test_matcher_low_quality_matches():
    gt = torch.tensor([[[20, 20, 27, 27]]], dtype=torch.float)  # best IoU 0.49 < 0.5
    valid = torch.ones(1, 1, dtype=torch.bool)
    assert Matcher(allow_low_quality_matches=False)(ANCHORS, gt, valid).labels[0, 2] == IGNORE
    assert Matcher()(ANCHORS, gt, valid).labels[0, 2] == FOREGROUND


def test_matcher_no_gt_and_padding():
    m = Matcher()(ANCHORS, torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool))
    assert (m.labels == BACKGROUND).all() and m.labels.shape == (2, 4)
    # one image with a box, one with only padding: padding must never match, even low-quality
    gt = torch.tensor([[[50, 50, 60, 60]], [[0, 0, 0, 0]]], dtype=torch.float)
    m = Matcher()(ANCHORS, gt, torch.tensor([[True], [False]]))
    assert m.labels.tolist() == [[BACKGROUND] * 3 + [FOREGROUND], [BACKGROUND] * 4]


def test_matcher_all_anchors_ignored():
    anchors = torch.tensor([[0, 0, 10, 10], [0, 0.1, 10, 10.1]])  # IoU 0.45 and 0.436
    gt = torch.tensor([[[0, 0, 10, 4.5]]])  # both in the ignore band [0.4, 0.5)
    m = Matcher(allow_low_quality_matches=False)(anchors, gt, torch.ones(1, 1, dtype=torch.bool))
    assert (m.labels == IGNORE).all()


def test_matcher_gt_overlapping_no_anchor_adds_nothing():
    gt = torch.tensor([[[100, 100, 110, 110]]], dtype=torch.float)  # IoU 0 with all anchors
    m = Matcher()(ANCHORS, gt, torch.ones(1, 1, dtype=torch.bool))
    assert (m.labels == BACKGROUND).all()


# ----------------------------------------------------------------------------- box coder
def test_box_coder_round_trip():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(100, 2, generator=g) * 500
    anchors = torch.cat([xy, xy + torch.rand(100, 2, generator=g) * 200 + 4], 1)
    xy = torch.rand(100, 2, generator=g) * 500
    boxes = torch.cat([xy, xy + torch.rand(100, 2, generator=g) * 300 + 2], 1)
    for weights in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]:
        coder = BoxCoder(weights)
        torch.testing.assert_close(coder.decode(coder.encode(anchors, boxes), anchors), boxes, atol=1e-3, rtol=1e-5)


def test_box_coder_identity_and_clamp():
    coder = BoxCoder()
    a = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    assert coder.encode(a, a).abs().max() == 0
    huge = coder.decode(torch.tensor([[0.0, 0.0, 1e4, 1e4]], dtype=torch.float16), a)
    assert huge.dtype == torch.float32 and torch.isfinite(huge).all()
    torch.testing.assert_close(huge[0, 2] - huge[0, 0], torch.tensor(1000.0))  # 16 * exp(log(1000/16))


# ----------------------------------------------------------------------------- head
def test_prior_init():
    head = RetinaNetHead(64, num_anchors=9, num_logits=5, num_convs=2)
    assert torch.allclose(head.cls_logits.bias, torch.full_like(head.cls_logits.bias, -math.log(99)))
    assert prior_bias(0.01) == pytest.approx(-math.log(99))
    cls, box = head([torch.randn(2, 64, 8, 8), torch.randn(2, 64, 4, 4)])
    assert [c.shape for c in cls] == [(2, 8 * 8 * 9, 5), (2, 4 * 4 * 9, 5)]
    assert [b.shape for b in box] == [(2, 8 * 8 * 9, 4), (2, 4 * 4 * 9, 4)]
    p = torch.cat(cls, 1).sigmoid().mean()
    assert p.item() == pytest.approx(0.01, rel=0.05)


def test_prior_init_with_background_logit():
    head = RetinaNetHead(32, num_anchors=1, num_logits=4, num_convs=1, background_logit=True)
    p = head([torch.randn(1, 32, 6, 6)])[0][0].softmax(-1)
    assert p[..., :3].mean().item() == pytest.approx(0.01, rel=0.05)


def test_head_group_norm_and_layout():
    head = RetinaNetHead(32, num_anchors=9, num_logits=3, num_convs=2, norm="gn")
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in head.modules()) == 4
    x = torch.randn(1, 32, 3, 5)
    logits = head([x])[0][0]  # (1, 3*5*9, 3)
    raw = head.cls_logits(head.cls_tower(x))  # (1, 9*3, 3, 5)
    # anchor a of location (y, x) sits at row (y*W + x)*A + a
    torch.testing.assert_close(logits[0, (2 * 5 + 4) * 9 + 7], raw[0, 7 * 3:8 * 3, 2, 4])
