"""init_weights / ResNetBackbone(weights=...): name and shape matching, prefixes, the load report,
refusals. The "pretrained" files are randomly initialised torchvision models (nothing downloads)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torchvision
import yaml

from focaldet.cli import main, run
from focaldet.errors import FocaldetError, WeightsError
from focaldet.modeling import ResNetBackbone, RetinaNet, prior_bias
from focaldet.modeling.weights import init_weights, load_matching, read_source
from focaldet.engine.module import RetinaNetModule

from helpers import ckpt_dir, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="session")
def resnet18_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tv_retinanet_file(tmp_path_factory):
    """A torchvision retinanet_resnet50_fpn (v1, 91 classes) state dict, as torchvision's COCO file."""
    torch.manual_seed(0)
    tv = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None)
    path = tmp_path_factory.mktemp("weights") / "retinanet_v1.pth"
    torch.save(tv.state_dict(), path)
    return path


def _tiny_model(num_classes=3, **kw):
    return RetinaNet(num_classes, backbone=ResNetBackbone(18, freeze_at=0), fpn_channels=32, num_convs=1, **kw)


def test_resnet_file_loads_every_tensor_under_any_prefix(resnet18_file, tmp_path, capsys):
    state = torch.load(resnet18_file, weights_only=True)
    for name, wrapped in {
        "plain": state,
        "lightning": {"state_dict": {f"model.backbone.body.{k}": v for k, v in state.items()}, "epoch": 3},
        "ddp": {f"module.{k}": v for k, v in state.items()},
    }.items():
        path = tmp_path / f"{name}.pth"
        torch.save(wrapped, path)
        backbone = ResNetBackbone(18, norm="bn", freeze_at=0, weights=str(path))
        ours = backbone.state_dict()
        for k, v in state.items():
            if not k.startswith("fc."):
                assert torch.equal(ours[k], v), (name, k)
        out = capsys.readouterr().out
        total = len([k for k in ours if not k.endswith("num_batches_tracked")])
        assert f"backbone weights: loaded {total} of {total} tensors from {path}" in out
        assert "not in the model: " in out and "fc.weight, " in out  # reported, not ignored


def test_backbone_refuses_a_file_that_does_not_fit(resnet18_file, tmp_path):
    state = torch.load(resnet18_file, weights_only=True)  # an unknown prefix: nothing would load
    torch.save({f"encoder.{k}": v for k, v in state.items()}, tmp_path / "encoder.pth")
    with pytest.raises(WeightsError, match=r"encoder.pth: only 0 of the backbone's 100 tensors match"):
        ResNetBackbone(18, weights=str(tmp_path / "encoder.pth"))
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(WeightsError, match="list.pth: not a state dict or checkpoint"):
        ResNetBackbone(18, weights=str(tmp_path / "list.pth"))
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(WeightsError, match="text.pth: not a readable PyTorch file"):
        ResNetBackbone(18, weights=str(tmp_path / "text.pth"))
    with pytest.raises(WeightsError, match="nope.pth: file not found"):
        ResNetBackbone(18, weights=str(tmp_path / "nope.pth"))


def test_focaldet_checkpoint_of_another_class_count(tmp_path):
    torch.manual_seed(0)
    src = _tiny_model(num_classes=5)
    torch.nn.init.constant_(src.head.cls_logits.bias, 3.0)
    ckpt = tmp_path / "five.ckpt"  # Lightning's layout: the module's names under "state_dict"
    torch.save({"state_dict": {f"model.{k}": v for k, v in src.state_dict().items()} | {"criterion.x": torch.ones(1)},
                "hyper_parameters": {"num_classes": 5}}, ckpt)
    dst = _tiny_model(num_classes=3)
    torch.nn.init.constant_(dst.head.cls_logits.bias, 7.0)  # must be re-initialised, not kept
    report = load_matching(dst, read_source(ckpt), str(ckpt))
    text = report.summary()
    total = len([k for k in dst.state_dict() if not k.endswith("num_batches_tracked")])
    assert text.startswith(f"init_weights: loaded {total - 2} of {total} tensors from {ckpt}")
    assert "skipped head.cls_logits.weight: source [45, 32, 3, 3] vs model [27, 32, 3, 3]" in text
    assert "skipped head.cls_logits.bias: source [45] vs model [27]" in text
    assert "re-initialised head.cls_logits" in text
    torch.testing.assert_close(dst.head.cls_logits.bias, torch.full((27,), prior_bias(0.01)))
    assert dst.head.cls_logits.weight.std().item() == pytest.approx(0.01, rel=0.2)
    for k, v in src.state_dict().items():
        if not k.startswith("head.cls_logits"):
            assert torch.equal(dst.state_dict()[k], v), k


def test_torchvision_retinanet_file_maps_onto_focaldet_names(tv_retinanet_file):
    state = torch.load(tv_retinanet_file, weights_only=True)
    model = RetinaNet(3, backbone=ResNetBackbone(50, freeze_at=5), p6_from="p5")
    report = init_weights(model, tv_retinanet_file)
    total = len([k for k in model.state_dict() if not k.endswith("num_batches_tracked")])
    assert len(report.loaded) == total - 2 and [n for n, _, _ in report.skipped] == \
        ["head.cls_logits.weight", "head.cls_logits.bias"]
    assert report.skipped[0][1] == (819, 256, 3, 3) and report.skipped[0][2] == (27, 256, 3, 3)
    ours = model.state_dict()
    assert torch.equal(ours["backbone.layer4.2.conv3.weight"], state["backbone.body.layer4.2.conv3.weight"])
    assert torch.equal(ours["fpn.lateral.0.weight"], state["backbone.fpn.inner_blocks.0.0.weight"])
    assert torch.equal(ours["head.bbox_pred.weight"], state["head.regression_head.bbox_reg.weight"])
    # a v1 file into a v2-shaped (GroupNorm head) model is an architecture mismatch, said in one line
    with pytest.raises(WeightsError, match="GroupNorm"):
        init_weights(RetinaNet(3, backbone=ResNetBackbone(50), head_norm="gn"), tv_retinanet_file)


def test_unknown_weights_name_is_one_line(tmp_path):
    with pytest.raises(WeightsError, match="neither a file nor a torchvision weights name"):
        read_source("NoSuch_Weights.V9")


@pytest.mark.slow
def test_finetune_from_torchvision_file_keeps_frozen_backbone_exact(tmp_path, synth_coco, tv_retinanet_file, capsys):
    """Fit 2 steps from a torchvision RetinaNet file with a frozen backbone: the saved
    checkpoint's backbone equals the file's tensor by tensor; the new class layer starts at the prior."""
    cfg = tiny_config(tmp_path, synth_coco, **{
        "trainer.max_steps": 2, "trainer.limit_val_batches": 0,
        "model.model.backbone": {"class_path": "focaldet.models.ResNetBackbone",
                           "init_args": {"depth": 50, "norm": "frozen_bn", "freeze_at": 5}},
        "model.model.fpn_channels": 256, "model.model.num_convs": 4, "model.model.p6_from": "p5",
        "model.init_weights": str(tv_retinanet_file), "data.min_size": 64, "data.max_size": 64})
    module = RetinaNetModule(4, model=partial(RetinaNet, backbone=ResNetBackbone(50, freeze_at=5), p6_from="p5"),
                             init_weights=str(tv_retinanet_file))
    torch.testing.assert_close(module.model.head.cls_logits.bias, torch.full((36,), prior_bias(0.01)))
    capsys.readouterr()
    main(["fit", "-c", str(cfg)])
    out = capsys.readouterr().out
    assert out.count("init_weights: loaded ") == 1 and "skipped head.cls_logits.weight: source [819, 256, 3, 3]" in out
    state = torch.load(tv_retinanet_file, weights_only=True)
    ckpt = torch.load(ckpt_dir(tmp_path / "run") / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["focaldet"]["init_weights"] == str(tv_retinanet_file)
    assert ckpt["hyper_parameters"]["init_weights"] is None  # rebuilding needs the checkpoint only
    backbone = {k[len("model.backbone."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.backbone.")}
    assert len(backbone) > 200
    for k, v in backbone.items():
        assert torch.equal(v, state[f"backbone.body.{k}"]), k


def test_init_weights_errors_reach_the_cli_as_one_line(tmp_path, synth_coco, capsys):
    (tmp_path / "junk.pth").write_bytes(b"\x00" * 100)
    cfg = tiny_config(tmp_path, synth_coco, **{"model.init_weights": str(tmp_path / "junk.pth")})
    with pytest.raises(FocaldetError, match="junk.pth: not a readable PyTorch file"):
        run(["fit", "-c", str(cfg)])
    assert main(["fit", "-c", str(cfg)]) != 0
    err = capsys.readouterr().err
    assert "junk.pth: not a readable PyTorch file" in err and "Traceback" not in err


def test_finetune_config_is_a_finetuning_recipe():
    from helpers import REPO

    cfg = yaml.safe_load((REPO / "configs" / "finetune_r50_coco.yaml").read_text())
    model = cfg["model"]["model"]
    assert model["backbone"]["init_args"]["norm"] == "frozen_bn" and model["p6_from"] == "p5"
    assert cfg["model"]["optimizer"]["init_args"]["lr"] < 0.01
    assert cfg["model"]["lr_scheduler"]["init_args"]["warmup_iters"] <= 200
