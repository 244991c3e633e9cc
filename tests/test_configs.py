"""Every shipped config parses and instantiates (paths pointed at a tiny synthetic set)."""

from pathlib import Path

import pytest

from focaldet.cli import FocaldetCLI
from focaldet.data.datamodule import CocoDataModule
from focaldet.module import RetinaNetModule

from helpers import REPO

pytestmark = pytest.mark.filterwarnings("ignore")
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
LOSSES = sorted((REPO / "configs" / "losses").glob("*.yaml"))


def _instantiate(args):
    return FocaldetCLI(RetinaNetModule, CocoDataModule, args=args, run=False,
                       trainer_defaults={"accelerator": "cpu", "devices": 1, "logger": False})


def _data_overrides(data):
    return ["--data.train_ann", str(data.train_ann), "--data.train_images", str(data.images),
            "--data.val_ann", str(data.val_ann), "--data.val_images", str(data.images)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_instantiates(config, synth_coco, tmp_path):
    args = ["-c", str(config), *_data_overrides(synth_coco), "--trainer.accelerator", "cpu",
            "--trainer.devices", "1", "--trainer.strategy", "auto", "--trainer.default_root_dir", str(tmp_path)]
    if "coco" in config.stem:
        args += ["--model.backbone.init_args.weights", "null"]  # never download in tests
    if "init_weights:" in config.read_text():  # a file or download the test does not have
        args += ["--model.init_weights", "null"]
    cli = _instantiate(args)
    assert cli.model.hparams.num_classes == 4
    assert cli.model.model.num_classes == 4


@pytest.mark.parametrize("loss", LOSSES, ids=lambda p: p.stem)
def test_loss_config_instantiates(loss, synth_coco, tmp_path):
    cli = _instantiate(["-c", str(REPO / "configs" / "synth.yaml"), "-c", str(loss), *_data_overrides(synth_coco),
                        "--trainer.default_root_dir", str(tmp_path)])
    crit = cli.model.criterion
    assert type(crit.cls_loss).__name__ in Path(loss).read_text() or type(crit.box_loss).__name__ in Path(loss).read_text()


def test_coco_config_is_the_paper_recipe():
    import yaml
    cfg = yaml.safe_load((REPO / "configs" / "retinanet_r50_fpn_1x_coco.yaml").read_text())
    assert cfg["trainer"]["max_steps"] == 90000 and cfg["model"]["lr_steps"] == [60000, 80000]
    assert cfg["data"]["batch_size"] * cfg["trainer"]["devices"] == cfg["model"]["base_batch_size"] == 16
    assert cfg["data"]["min_size"] == 800 and cfg["data"]["max_size"] == 1333
