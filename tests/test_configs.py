"""Every shipped config parses and instantiates (paths pointed at a tiny synthetic set)."""

from pathlib import Path

import pytest
import torch

from focaldet.cli import FocaldetCLI
from focaldet.data.datamodule import CocoDataModule
from focaldet.engine.module import RetinaNetModule

from helpers import REPO

pytestmark = pytest.mark.filterwarnings("ignore")
# whole recipes; overlays (configs/ema.yaml: a trainer callback only) combine with one and are tested in test_ema.py
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml") if "\ndata:" in "\n" + p.read_text())
LOSSES = sorted((REPO / "configs" / "losses").glob("*.yaml"))


def _instantiate(args):
    return FocaldetCLI(RetinaNetModule, CocoDataModule, args=args, run=False,
                       trainer_defaults={"accelerator": "cpu", "devices": 1, "logger": False})


def _offline(config: Path) -> list[str]:
    """Overrides that keep a config from downloading weights (or reading files the test lacks)."""
    text, args = config.read_text(), []
    if "coco" in config.stem or "_Weights." in text:
        args += ["--model.model.backbone.weights", "null"]  # never download in tests
    if "init_weights:" in text:  # a file or download the test does not have
        args += ["--model.init_weights", "null"]
    return args


def _data_overrides(data):
    return ["--data.train_ann", str(data.train_ann), "--data.train_images", str(data.images),
            "--data.val_ann", str(data.val_ann), "--data.val_images", str(data.images)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_instantiates(config, synth_coco, tmp_path):
    args = ["-c", str(config), *_data_overrides(synth_coco), "--trainer.accelerator", "cpu",
            "--trainer.devices", "1", "--trainer.strategy", "auto", "--trainer.default_root_dir", str(tmp_path)]
    args += _offline(config)
    cli = _instantiate(args)
    assert cli.model.hparams.num_classes == 4
    assert cli.model.model.num_classes == 4


@pytest.fixture(scope="module")
def tiny(synth_coco, tmp_path_factory):
    """The tiny config and one training batch of it (2 images at 128 px), for the loss configs."""
    from helpers import tiny_config

    config = tiny_config(tmp_path_factory.mktemp("tiny"), synth_coco)
    cli = _instantiate(["-c", str(config)])
    cli.datamodule.setup("fit")
    return config, next(iter(cli.datamodule.train_dataloader()))


@pytest.mark.slow  # trains (a fit), exports or starts a process: see docs/testing.md
@pytest.mark.parametrize("loss", LOSSES, ids=lambda p: p.stem)
def test_loss_config_instantiates_and_trains(loss, tmp_path, tiny):
    """Each configs/losses/*.yaml stacks on a config, and two optimiser steps on a real batch
    keep the loss and every weight finite (what one CLI fit per loss checked before; the CLI's
    own fit is tested once, in test_cli.py; every shipped config takes a loss's flags:
    `test_every_config_tunes_the_default_loss_without_naming_it`)."""
    config, tiny_batch = tiny
    cli = _instantiate(["-c", str(config), "-c", str(loss), "--trainer.default_root_dir", str(tmp_path)])
    crit = cli.model.criterion
    assert type(crit.cls_loss).__name__ in Path(loss).read_text() or type(crit.box_loss).__name__ in Path(loss).read_text()
    module = cli.model.train()
    optimizer = module.configure_optimizers()["optimizer"]
    for _ in range(2):
        losses = module._losses(tiny_batch)
        assert all(torch.isfinite(v) for v in losses.values()), losses
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_coco_config_is_the_paper_recipe():
    import yaml
    cfg = yaml.safe_load((REPO / "configs" / "retinanet_r50_fpn_1x_coco.yaml").read_text())
    schedule, sgd = cfg["model"]["lr_scheduler"]["init_args"], cfg["model"]["optimizer"]
    assert cfg["trainer"]["max_steps"] == 90000 and schedule["milestones"] == [60000, 80000]
    assert schedule["warmup_iters"] == 1000 and sgd["class_path"] == "torch.optim.SGD"
    assert sgd["init_args"] == {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0001}
    assert cfg["data"]["batch_size"] * cfg["trainer"]["devices"] == cfg["model"]["base_batch_size"] == 16
    assert cfg["data"]["min_size"] == 800 and cfg["data"]["max_size"] == 1333


def _cpu(config: Path, data, root: Path) -> list[str]:
    return [*_data_overrides(data), "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy",
            "auto", "--trainer.default_root_dir", str(root), *_offline(config)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_config_tunes_the_default_loss_without_naming_it(config, synth_coco, tmp_path):
    """``--model.criterion.cls_loss.gamma 0`` (and the box loss's beta) work on every shipped config:
    the configs spell the default losses out."""
    from focaldet.losses import SigmoidFocalLoss, SmoothL1Loss

    cli = _instantiate(["-c", str(config), *_cpu(config, synth_coco, tmp_path), "--model.criterion.cls_loss.gamma",
                        "0", "--model.criterion.box_loss.beta", "0.5"])
    cls_loss, box_loss = cli.model.criterion.cls_loss, cli.model.criterion.box_loss
    assert type(cls_loss) is SigmoidFocalLoss and (cls_loss.gamma, cls_loss.alpha) == (0.0, 0.25)
    assert type(box_loss) is SmoothL1Loss and box_loss.beta == 0.5
    default = _instantiate(["-c", str(config), *_cpu(config, synth_coco, tmp_path / "d")]).model.criterion
    assert (default.cls_loss.gamma, default.cls_loss.alpha, default.cls_loss.normalizer) == (2.0, 0.25, "num_pos")
    assert default.box_loss.beta == 0.1  # the paper's defaults, as without the config's lines


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_a_sweep_over_gamma_parses_on_every_config(config, synth_coco, tmp_path, monkeypatch):
    """``focaldet sweep -c CONFIG --param model.criterion.cls_loss.gamma=0,2``: both cells build
    their run (the training itself is replaced by reading the built model's gamma)."""
    from focaldet.tools import sweep
    from focaldet.evaluation import STAT_NAMES
    from focaldet.engine.runs import build_run

    built = []

    def build_only(configs, args, root_dir):
        gamma = build_run(configs, args, root_dir).model.criterion.cls_loss.gamma
        built.append(gamma)
        return {"stats": dict.fromkeys(STAT_NAMES, 0.1), "per_class": {}, "per_class_ap50": {}, "steps": 0,
                "train_s": 0.0, "wall_s": 0.0}

    monkeypatch.setattr(sweep, "_default_run", build_only)
    status = sweep.main(["-c", str(config), "--param", "model.criterion.cls_loss.gamma=0,2", "--out",
                         str(tmp_path / "sweep"), *_cpu(config, synth_coco, tmp_path)])
    assert status == 0 and built == [0.0, 2.0]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_the_input_size_is_set_in_one_place(config, synth_coco, tmp_path, capsys):
    """``--print_config`` shows one input size: a config that sizes its images in
    ``train_transforms``/``eval_transforms`` shows ``data.min_size``/``max_size`` as null; the
    model part shows none of the arguments the module sets from the data (RetinaNet's own
    defaults, ``min_size: 800``, were printed there)."""
    import yaml

    from focaldet.cli import main
    from focaldet.engine.module import MODEL_SET_BY_MODULE

    with pytest.raises(SystemExit):
        main(["fit", "-c", str(config), *_cpu(config, synth_coco, tmp_path), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert not set(MODEL_SET_BY_MODULE) & set(printed["model"]["model"]["init_args"])
    data = printed["data"]
    if data.get("eval_transforms") or data.get("train_transforms"):
        assert data["min_size"] is None and data["max_size"] is None
    else:
        assert data["min_size"] is not None and data["max_size"] is not None


def test_the_photos_config_is_for_natural_images(synth_coco, tmp_path):
    """configs/photos.yaml: horizontal flips only, COCO's anchors, a short fine-tuning schedule
    from ImageNet weights; evaluated at the largest training size."""
    import albumentations as A
    import yaml

    from focaldet.models import AnchorGenerator

    config = REPO / "configs" / "photos.yaml"
    raw = yaml.safe_load(config.read_text())
    assert raw["model"]["model"]["backbone"]["init_args"]["weights"] == "ResNet18_Weights.IMAGENET1K_V1"
    assert raw["trainer"]["max_steps"] <= 3000 and raw["model"]["lr_scheduler"]["init_args"]["warmup_iters"] <= 200
    cli = _instantiate(["-c", str(config), *_cpu(config, synth_coco, tmp_path)])
    dm = cli.datamodule
    steps = dm._transforms(train=True).transforms
    assert [type(t).__name__ for t in steps] == ["ResizeShortestEdge", "HorizontalFlip"]
    assert not any(isinstance(t, (A.VerticalFlip, A.Rotate, A.Transpose)) for t in steps)
    assert cli.model.model.anchor_generator.sizes == AnchorGenerator().sizes  # COCO's 32-512
    assert dm.inputs.min_size == max(raw["data"]["min_size"]) and dm.inputs.max_size == raw["data"]["max_size"]
