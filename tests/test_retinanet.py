"""The whole model: shapes, predict, and exact parity with torchvision's RetinaNet."""

import pytest
import torch
from torchvision.models.detection import retinanet_resnet50_fpn

from focaldet.models import ResNetBackbone, RetinaNet


def _tiny(num_classes=3, **kw):
    return RetinaNet(num_classes, backbone=ResNetBackbone(18, norm="bn", freeze_at=0), fpn_channels=32,
                     num_convs=1, head_norm=None, **kw)


def test_forward_shapes_and_padding_normalisation():
    model = _tiny().eval()
    images = torch.randint(0, 256, (2, 3, 128, 256), dtype=torch.uint8)
    sizes = torch.tensor([[128, 256], [100, 130]])
    x = model.normalize(images, sizes)
    assert (x[1, :, 100:] == 0).all() and (x[1, :, :, 130:] == 0).all() and (x[0] != 0).any()
    out = model(x)
    shapes = model.anchor_generator.feature_shapes(128, 256)
    assert [t.shape for t in out["cls_logits"]] == [(2, h * w * 9, 3) for h, w in shapes]
    assert out["anchors"].shape == (sum(h * w * 9 for h, w in shapes), 4)
    dets = model.detect(out, sizes)
    assert len(dets) == 2 and all(set(d) == {"boxes", "scores", "labels"} for d in dets)


def test_predict_returns_boxes_in_input_pixels():
    model = _tiny(min_size=96, max_size=160).eval()
    with torch.no_grad():
        model.head.cls_logits.bias.fill_(0.0)  # many detections
    images = [torch.rand(3, 60, 90), torch.rand(3, 120, 70)]
    dets = model.predict(images)
    for d, img in zip(dets, images):
        assert 0 < len(d["boxes"]) <= 100
        assert (d["boxes"][:, [0, 2]] <= img.shape[2] + 1e-3).all() and (d["boxes"][:, [1, 3]] <= img.shape[1] + 1e-3).all()
        assert (d["scores"][:-1] >= d["scores"][1:]).all() and d["labels"].max() < 3


def test_softmax_model_sizes_its_head_from_the_flag():
    model = _tiny(background_logit=True)
    assert model.head.cls_logits.out_channels == 9 * 4


@pytest.fixture(scope="module")
def torchvision_pair():
    torch.manual_seed(0)
    tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5, min_size=224, max_size=360).eval()
    with torch.no_grad():  # random weights, bias set so that hundreds of detections pass 0.05
        tv.head.classification_head.cls_logits.bias.fill_(-1.5)
    return tv, RetinaNet.from_torchvision(tv, channels_last=False)


def test_torchvision_parity(torchvision_pair):
    """Bit-for-bit the same detections as torchvision's RetinaNet with the same weights."""
    tv, ours = torchvision_pair
    torch.manual_seed(1)
    # sizes whose padded size is not a multiple of 128: torchvision's P6/P7 strides are reproduced
    images = [torch.rand(3, 200, 300), torch.rand(3, 170, 211), torch.rand(3, 240, 180)]
    with torch.no_grad():
        ref, got = tv(images), ours.predict(images)
    for r, g in zip(ref, got):
        assert len(r["boxes"]) >= 200
        assert len(r["boxes"]) == len(g["boxes"])
        torch.testing.assert_close(g["boxes"], r["boxes"], atol=1e-3, rtol=0)
        torch.testing.assert_close(g["scores"], r["scores"], atol=1e-4, rtol=0)
        assert torch.equal(g["labels"], r["labels"])


def test_from_torchvision_copies_settings(torchvision_pair):
    tv, ours = torchvision_pair
    assert ours.postprocess.detections_per_img == tv.detections_per_img
    assert ours.fpn.p6_from == "p5" and ours.size_divisibility == 32 and ours.min_size == 224
    def numel(m):  # BatchNorm affine params are buffers in FrozenBatchNorm2d: count state
        return sum(v.numel() for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked"))
    assert numel(ours) == numel(tv)


def test_backbone_weights_from_file(tmp_path):
    import torchvision
    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    bb = ResNetBackbone(18, weights=str(path))
    torch.testing.assert_close(bb.layer3[0].conv1.weight, ref.layer3[0].conv1.weight)
    assert not bb.conv1.weight.requires_grad and not bb.layer1[0].conv1.weight.requires_grad
    assert bb.layer2[0].conv1.weight.requires_grad


def test_bad_backbone_settings_are_clear():
    from focaldet.errors import ConfigError, WeightsError
    with pytest.raises(ConfigError, match="depth"):
        ResNetBackbone(depth=42)
    with pytest.raises(WeightsError, match="not found"):
        ResNetBackbone(18, weights="/nonexistent/r18.pth")


def test_channels_last_is_the_same_model(torchvision_pair):
    """NHWC (the default) changes only the memory order: raw outputs agree to float rounding."""
    tv, nchw = torchvision_pair
    nhwc = RetinaNet.from_torchvision(tv)
    assert nhwc.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    _assert_same_raw_outputs(nchw, nhwc, torch.randn(2, 3, 256, 384))


def _assert_same_raw_outputs(model, other, x):
    """``model(x)`` and ``other(x)`` agree to float rounding, level by level."""
    with torch.no_grad():
        a, b = model(x), other(x)
    for key in ("cls_logits", "box_deltas"):
        for u, v in zip(a[key], b[key]):
            torch.testing.assert_close(v, u, atol=1e-4, rtol=1e-4)


def test_frozen_bn_fused_path_equals_torchvision():
    from torchvision.ops import FrozenBatchNorm2d as TvFrozen

    from focaldet.modeling.backbone import FrozenBatchNorm2d
    torch.manual_seed(0)
    ours, ref = FrozenBatchNorm2d(8), TvFrozen(8)
    for name, value in {"weight": torch.rand(8), "bias": torch.randn(8), "running_mean": torch.randn(8),
                        "running_var": torch.rand(8) + 0.1}.items():
        getattr(ours, name).copy_(value), getattr(ref, name).copy_(value)
    x = torch.randn(2, 8, 5, 7)
    torch.testing.assert_close(ours(x), ref(x))  # no grad: one fused F.batch_norm
    xg = x.clone().requires_grad_()
    ours(xg).sum().backward()
    xr = x.clone().requires_grad_()
    ref(xr).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad)


def test_fuse_batchnorm_keeps_the_outputs(torchvision_pair):
    """Frozen BN folded into the convolutions (inference): the same raw outputs and detections."""
    import copy
    from collections import OrderedDict

    from torchvision.ops import FrozenBatchNorm2d

    from focaldet.modeling.backbone import fuse_frozen_batchnorm
    _, ours = torchvision_pair
    model = copy.deepcopy(ours)
    g = torch.Generator().manual_seed(0)
    for m in model.modules():  # statistics and affine far from the identity
        if isinstance(m, FrozenBatchNorm2d):
            c = m.weight.shape[0]
            m.weight.copy_(0.5 + torch.rand(c, generator=g)), m.bias.copy_(0.1 * torch.randn(c, generator=g))
            m.running_mean.copy_(0.1 * torch.randn(c, generator=g)), m.running_var.copy_(0.5 + torch.rand(c, generator=g))
    fused = copy.deepcopy(model).fuse_batchnorm()
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in fused.modules())
    assert fuse_frozen_batchnorm(ResNetBackbone(18)) == 20  # stem, 8 blocks x 2, 3 downsample branches
    bn = FrozenBatchNorm2d(4)
    bn.weight.fill_(2.0)
    pair = torch.nn.Sequential(OrderedDict(conv1=torch.nn.Conv2d(3, 4, 3), bn1=bn))  # both rules find it
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        ref = pair(x)
    assert fuse_frozen_batchnorm(pair) == 1
    with torch.no_grad():
        torch.testing.assert_close(pair(x), ref)  # folded once, not twice
    _assert_same_raw_outputs(model, fused, torch.randn(2, 3, 256, 320))
    images = [torch.rand(3, 200, 300, generator=g)]
    ref, got = model.predict(images)[0], fused.predict(images)[0]
    assert len(ref["scores"]) > 50 and torch.equal(got["labels"], ref["labels"])
    torch.testing.assert_close(got["scores"], ref["scores"], atol=1e-4, rtol=0)


def test_to_torchvision_twin_detects_the_same():
    """``to_torchvision`` builds torchvision's RetinaNet with our architecture and weights;
    with anchors that torchvision's rounding leaves exact, detections are the same."""
    from focaldet.models import AnchorGenerator
    torch.manual_seed(0)
    ours = RetinaNet(3, backbone=ResNetBackbone(18, norm="bn", freeze_at=1), fpn_channels=32, num_convs=2,
                     anchor_generator=AnchorGenerator(sizes=[16, 32, 64, 128, 256], scales=[1.0, 2.0],
                                                      aspect_ratios=[1.0, 4.0]),
                     min_size=128, max_size=256, channels_last=False).eval()
    with torch.no_grad():
        ours.head.cls_logits.bias.normal_(0, 1)  # scores above the threshold everywhere
    tv = ours.to_torchvision().eval()
    assert len(tv.head.classification_head.conv) == 2 and tv.transform.size_divisible == 128
    assert not tv.backbone.body.conv1.weight.requires_grad and tv.backbone.body.layer1[0].conv1.weight.requires_grad
    images = [torch.rand(3, 128, 192), torch.rand(3, 128, 150)]
    with torch.no_grad():
        ref, got = tv(images), ours.predict(images)
    for r, g in zip(ref, got):  # the same detections, up to the order of equal scores
        assert len(g["boxes"]) == len(r["boxes"]) == 100
        torch.testing.assert_close(g["scores"], r["scores"], atol=1e-5, rtol=0)
        same = (torch.cdist(g["boxes"], r["boxes"], p=1) < 1e-3) & (g["labels"][:, None] == r["labels"][None])
        assert same.any(1).all() and same.any(0).all()


def test_to_torchvision_refuses_what_torchvision_cannot_express():
    from focaldet.errors import ConfigError
    from focaldet.losses import RetinaNetCriterion, SmoothL1Loss
    model = RetinaNet(3, backbone=ResNetBackbone(18), fpn_channels=32, num_convs=1)
    with pytest.raises(ConfigError, match="box loss"):
        model.to_torchvision(RetinaNetCriterion(box_loss=SmoothL1Loss(beta=0.1)))
    with pytest.raises(ConfigError, match="GroupNorm|gn|norm"):
        RetinaNet(3, backbone=ResNetBackbone(18, norm="gn"), fpn_channels=32, num_convs=1).to_torchvision()


def test_twin_losses_equal_torchvision_losses():
    """Same weights, same image, same boxes: focaldet's criterion and torchvision's
    ``compute_loss`` agree (one image, so both normalise by the same positive count), and so
    do the gradients -- the implementation is faithful, not just similar."""
    from focaldet.losses import L1Loss, RetinaNetCriterion
    from focaldet.models import AnchorGenerator
    torch.manual_seed(0)
    ours = RetinaNet(3, backbone=ResNetBackbone(18, norm="frozen_bn", freeze_at=0), fpn_channels=32, num_convs=1,
                     anchor_generator=AnchorGenerator(scales=[1.0, 2.0], aspect_ratios=[1.0, 4.0]),
                     channels_last=False).train()
    criterion = RetinaNetCriterion(box_loss=L1Loss(), box_coder=ours.box_coder)
    tv = ours.to_torchvision(criterion).train()
    image = torch.randint(0, 256, (1, 3, 160, 224), dtype=torch.uint8)
    boxes = torch.tensor([[[10.0, 20.0, 90.0, 100.0], [100.0, 30.0, 140.0, 150.0], [150.0, 5.0, 220.0, 60.0]]])
    labels = torch.tensor([[0, 2, 1]])
    padded = torch.zeros(1, 3, 256, 256, dtype=torch.uint8)  # as collate_detection pads it
    padded[:, :, :160, :224] = image
    got = criterion(ours(ours.normalize(padded, torch.tensor([[160, 224]]))), boxes, labels)
    ref = tv([image[0].float() / 255], [{"boxes": boxes[0], "labels": labels[0]}])
    assert got["num_pos"] > 3
    torch.testing.assert_close(got["loss_cls"], ref["classification"].detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got["loss_box"], ref["bbox_regression"].detach(), rtol=1e-4, atol=1e-6)
    got["loss"].backward()
    sum(ref.values()).backward()
    for a, b in [(ours.head.cls_logits.weight, tv.head.classification_head.cls_logits.weight),
                 (ours.head.bbox_pred.weight, tv.head.regression_head.bbox_reg.weight),
                 (ours.backbone.layer2[0].conv1.weight, tv.backbone.body.layer2[0].conv1.weight)]:
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_training_and_detection_under_autocast(dtype):
    """Mixed precision (``--trainer.precision bf16-mixed`` / ``16-mixed``), here through CPU
    autocast: the head runs in ``dtype``, the losses come out in fp32 and within 1 % of the
    fp32 losses, the gradients are finite, and detections are fp32 boxes in the image."""
    from focaldet.losses import RetinaNetCriterion
    torch.manual_seed(0)
    model, criterion = _tiny().train(), RetinaNetCriterion()
    images = torch.randint(0, 256, (2, 3, 128, 128), dtype=torch.uint8)
    sizes = torch.tensor([[128, 128], [128, 100]])
    boxes = torch.tensor([[[10.0, 10.0, 60.0, 70.0], [50.0, 40.0, 120.0, 110.0]], [[5.0, 5.0, 40.0, 30.0], [0, 0, 0, 0]]])
    labels = torch.tensor([[0, 2], [1, -1]])
    reference = criterion(model(model.normalize(images, sizes)), boxes, labels)
    with torch.autocast("cpu", dtype=dtype):
        outputs = model(model.normalize(images, sizes))
        losses = criterion(outputs, boxes, labels)
    assert outputs["cls_logits"][0].dtype == outputs["box_deltas"][0].dtype == dtype
    for key in ("loss", "loss_cls", "loss_box"):
        assert losses[key].dtype == torch.float32
        torch.testing.assert_close(losses[key], reference[key].detach(), rtol=1e-2, atol=0)
    losses["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad():
        model.head.cls_logits.bias.fill_(0.0)  # scores ~0.5: many detections
        with torch.autocast("cpu", dtype=dtype):
            detections = model.detect(model(model.normalize(images, sizes)), sizes)
    for d, (h, w) in zip(detections, sizes.tolist()):
        assert len(d["boxes"]) > 0 and d["boxes"].dtype == d["scores"].dtype == torch.float32
        assert (d["boxes"][:, [0, 2]] <= w).all() and (d["boxes"][:, [1, 3]] <= h).all()
