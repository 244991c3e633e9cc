"""Backbones beyond ResNet: torchvision classifiers through feature extraction, timm through
features_only; every shipped configs/backbones/*.yaml trains, saves, loads and predicts."""

from __future__ import annotations


import pytest
import torch
import torchvision

import focaldet
from focaldet.cli import main
from focaldet.errors import ConfigError, WeightsError
from focaldet.models import ResNetBackbone, TimmBackbone, TorchvisionBackbone
from focaldet.modeling.backbone import FrozenBatchNorm2d

from helpers import REPO, ckpt_dir, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore")
BACKBONE_CONFIGS = sorted((REPO / "configs" / "backbones").glob("*.yaml"))
# (name, C3-C5 module outputs, channels): torchvision's own stage layout
TORCHVISION = [
    ("mobilenet_v3_large", ["features.6", "features.12", "features.16"], (40, 112, 960)),
    ("efficientnet_b0", ["features.3", "features.5", "features.8"], (40, 112, 1280)),
    ("convnext_tiny", ["features.3", "features.5", "features.7"], (192, 384, 768)),
    ("regnet_y_800mf", ["trunk_output.block2", "trunk_output.block3", "trunk_output.block4"], (144, 320, 784)),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, nodes, channels", TORCHVISION, ids=[t[0] for t in TORCHVISION])
def test_torchvision_backbone_finds_c3_c5(name, nodes, channels):
    torch.manual_seed(0)
    b = TorchvisionBackbone(name).eval()
    assert b.return_nodes == nodes and b.out_channels == channels
    x = torch.rand(2, 3, 96, 160)
    c3, c4, c5 = b(x)
    assert [tuple(c.shape) for c in (c3, c4, c5)] == [(2, channels[0], 12, 20), (2, channels[1], 6, 10),
                                                      (2, channels[2], 3, 5)]
    # C5 is the classifier's own feature output, computed by torchvision with the same weights
    net = torchvision.models.get_model(name, weights=None).eval()
    net.load_state_dict({k[len("net."):]: v for k, v in b.state_dict().items()}, strict=False)
    body = net.features if hasattr(net, "features") else torch.nn.Sequential(net.stem, net.trunk_output)
    with torch.no_grad():
        torch.testing.assert_close(c5, body(x))


def test_weights_file_norm_and_freeze(tmp_path, capsys):
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v3_large(weights=None)
    for m in net.modules():  # statistics a frozen BatchNorm must keep
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
    torch.save(net.state_dict(), tmp_path / "mnv3.pth")
    b = TorchvisionBackbone("mobilenet_v3_large", norm="frozen_bn", freeze_at=2, weights=str(tmp_path / "mnv3.pth"))
    report = capsys.readouterr().out
    assert "backbone weights: loaded" in report and "classifier.0.weight" in report  # the head: not loaded, said
    state = b.state_dict()
    for k, v in net.state_dict().items():
        if not k.startswith("classifier") and not k.endswith("num_batches_tracked"):
            assert torch.equal(state["net." + k], v), k
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in b.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in b.modules())
    # freeze_at 2: stride <= 4 (features.0-3) frozen, features.4 (stride 8) trains
    assert not any(p.requires_grad for p in b.net.get_submodule("features.3").parameters())
    assert all(p.requires_grad for p in b.net.get_submodule("features.4").parameters())
    b.eval()
    x = torch.rand(1, 3, 64, 64)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(b(x)[2], net.features(x), rtol=1e-4, atol=1e-4)
    gn = TorchvisionBackbone("efficientnet_b0", norm="gn", freeze_at=5)
    assert any(isinstance(m, torch.nn.GroupNorm) for m in gn.modules())
    assert not any(p.requires_grad for p in gn.parameters())


def test_bad_names_and_files_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="not a torchvision classification model"):
        TorchvisionBackbone("mobilenet_v9")
    with pytest.raises(ConfigError, match="neither a file nor a torchvision weights name"):
        TorchvisionBackbone("mobilenet_v3_large", weights="NO_SUCH_WEIGHTS")
    bad = tmp_path / "resnet.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), bad)
    with pytest.raises(WeightsError, match="only 0 of the backbone"):
        TorchvisionBackbone("mobilenet_v3_large", weights=str(bad))
    with pytest.raises(ConfigError, match="norm must be one of"):
        TorchvisionBackbone("mobilenet_v3_large", norm="ln")


def test_timm_backbone_equals_timm_and_resnet():
    pytest.importorskip("timm")
    torch.manual_seed(0)
    b = TimmBackbone("resnet18").eval()
    assert b.out_channels == (128, 256, 512)
    # timm's resnet18 has torchvision's names: the same weights give ResNetBackbone's C3-C5
    r = ResNetBackbone(depth=18, norm="bn", freeze_at=0).eval()
    r.load_state_dict({k[len("net."):]: v for k, v in b.state_dict().items()})
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        for got, ref in zip(b(x), r(x)):
            torch.testing.assert_close(got, ref)
    frozen = TimmBackbone("efficientnet_b0", freeze_at=3)
    assert frozen.out_channels == (40, 112, 320)
    trainable = {n.split(".")[1] for n, p in frozen.net.named_parameters() if p.requires_grad}
    assert trainable == {"3", "4", "5", "6"}  # blocks.0-2 (stride <= 8) and the stem frozen


@pytest.mark.slow
@pytest.mark.parametrize("config", BACKBONE_CONFIGS, ids=lambda p: p.stem)
def test_backbone_config_trains_saves_loads_predicts(config, synth_coco, tmp_path):
    """2 steps at 64 px from the CLI, then focaldet.load rebuilds the backbone and predicts."""
    if "timm" in config.read_text():
        pytest.importorskip("timm")
    cfg = tiny_config(tmp_path, synth_coco, **{"trainer.max_steps": 2, "trainer.val_check_interval": 2,
                                               "data.min_size": 64, "data.max_size": 64})
    assert main(["fit", "-c", str(cfg), "-c", str(config)]) == 0
    ckpt = ckpt_dir(tmp_path / "run") / "last.ckpt"
    det = focaldet.load(ckpt, device="cpu")
    backbone = det.model.backbone
    assert type(backbone).__name__ in config.read_text() and backbone.name in config.read_text()
    out = det.predict(synth_coco.images / sorted(p.name for p in synth_coco.images.iterdir())[0])
    assert set(out[0]) >= {"boxes", "scores"}
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    loaded = det.model.state_dict()
    assert all(torch.equal(loaded[k[len("model."):]], v) for k, v in saved.items() if k.startswith("model."))


@pytest.mark.slow
def test_mobilenet_onnx_matches_predict(mobilenet_onnx, synth_coco):
    """A non-ResNet detector exports to ONNX (frozen BN fused) and onnxruntime gives predict's
    detections: boxes within 0.5 px, scores within 1e-3 (the export: `artifacts.export_mobilenet`)."""
    pytest.importorskip("onnxruntime")
    from focaldet.data import read_image
    from focaldet.export import ExportedDetector

    from artifacts import mobilenet_detector

    model = mobilenet_detector()  # the exported model, built again here
    onnx = ExportedDetector(mobilenet_onnx)
    for image_path in sorted(synth_coco.images.iterdir())[:2]:
        image = read_image(image_path)
        ref = model.predict([torch.from_numpy(image).permute(2, 0, 1).float() / 255])[0]
        got = onnx.predict_image(image)
        assert len(ref["scores"]) > 10 and abs(len(got["scores"]) - len(ref["scores"])) <= 1
        cats = torch.tensor([1, 2, 3])[ref["labels"]]
        for j in range(20):
            close = ((got["scores"] - ref["scores"][j]).abs() <= 1e-3) & (got["category_ids"] == cats[j]) \
                & ((got["boxes"] - ref["boxes"][j]).abs().amax(1) <= 0.5)
            assert close.any(), f"detection {j} unmatched"
