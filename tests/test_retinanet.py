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
    return tv, RetinaNet.from_torchvision(tv)


def test_torchvision_parity(torchvision_pair):
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
    from focaldet.errors import ConfigError
    with pytest.raises(ConfigError, match="depth"):
        ResNetBackbone(depth=42)
    with pytest.raises(ConfigError, match="not found"):
        ResNetBackbone(18, weights="/nonexistent/r18.pth")
