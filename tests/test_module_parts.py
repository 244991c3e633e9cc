"""``RetinaNetModule`` takes parts (model, criterion, optimizer, lr_scheduler, evaluation,
prediction): the paper's schedule as a scheduler class, the linear scaling rule, the recipe a
checkpoint stores rebuilding the same module, and the flat keys of earlier versions named
with their new home in one line."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from focaldet.cli import main
from focaldet.config.migrate import FLAT_KEYS, upgrade_recipe
from focaldet.engine.module import RetinaNetModule
from focaldet.engine.schedules import WarmupMultiStepLR
from focaldet.errors import ConfigError
from focaldet.losses import GIoULoss, RetinaNetCriterion, SoftmaxFocalLoss
from focaldet.models import ResNetBackbone, RetinaNet

from helpers import REPO

TINY = partial(RetinaNet, backbone=ResNetBackbone(depth=18, freeze_at=0), fpn_channels=16, num_convs=1)


def _lrs(scheduler, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def test_warmup_multistep_is_the_papers_schedule():
    """Linear warmup from lr x 0.001 (Goyal et al.), x0.1 at each milestone (Lin et al.): the
    formula the module used before, step by step."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    lrs = _lrs(WarmupMultiStepLR(opt, warmup_iters=10, warmup_factor=0.001, milestones=[15, 18], gamma=0.1), 20)
    for it, lr in enumerate(lrs):
        warm = 1.0 if it >= 10 else 0.001 + (1 - 0.001) * it / 10
        assert lr == pytest.approx(0.01 * warm * 0.1 ** sum(it >= m for m in (15, 18)), rel=1e-12), it
    assert lrs[0] == pytest.approx(1e-5) and lrs[12] == 0.01 and lrs[16] == pytest.approx(1e-3)


def test_linear_scaling_rule_scales_the_optimizers_rate():
    """lr is for base_batch_size images: 8 per device on one device with base 16 halves it; null
    leaves it; the schedule starts from the scaled rate; norms and biases can skip weight decay."""
    for base, expected in ((16, 0.005), (4, 0.02), (None, 0.01)):
        module = RetinaNetModule(2, model=TINY, base_batch_size=base, batch_size=8,
                                 optimizer=partial(torch.optim.SGD, lr=0.01, momentum=0.9, weight_decay=1e-4),
                                 lr_scheduler=partial(WarmupMultiStepLR, warmup_iters=0))
        conf = module.configure_optimizers()
        assert conf["optimizer"].param_groups[0]["lr"] == pytest.approx(expected)
        assert conf["lr_scheduler"]["scheduler"].base_lrs[0] == pytest.approx(expected)
        assert conf["lr_scheduler"]["interval"] == "step"
    module = RetinaNetModule(2, model=TINY, decay_norm_and_bias=False)
    groups = module.configure_optimizers()["optimizer"].param_groups
    assert groups[0]["weight_decay"] == 1e-4 and groups[1]["weight_decay"] == 0.0
    biases = {id(p) for n, p in module.named_parameters() if n.endswith("bias") and p.requires_grad}
    assert biases <= {id(p) for p in groups[1]["params"]}


def test_the_stored_recipe_rebuilds_the_same_module(tmp_path):
    """hparams -> build_module -> hparams is the identity, the parts included; the module sets
    the model's classes and its background logit from the class loss it declares."""
    from focaldet.api import CheckpointContents, build_module
    from focaldet.config.inputs import InputSettings

    module = RetinaNetModule(3, model=TINY, criterion=RetinaNetCriterion(SoftmaxFocalLoss(), GIoULoss()),
                             optimizer=partial(torch.optim.AdamW, lr=0.002, weight_decay=0.05),
                             lr_scheduler=partial(WarmupMultiStepLR, warmup_iters=5, milestones=[7]),
                             evaluation={"max_dets": 50}, prediction={"score_threshold": 0.4})
    assert module.model.num_classes == 3 and module.model.background_logit  # K + 1 logits for the softmax loss
    assert module.criterion.box_coder is module.model.box_coder
    recipe = dict(module.hparams)
    rebuilt = build_module(CheckpointContents(tmp_path / "x.ckpt", recipe, None, InputSettings(), module.state_dict()))
    assert dict(rebuilt.hparams) == recipe
    assert type(rebuilt.criterion.cls_loss) is SoftmaxFocalLoss and rebuilt.evaluation.max_dets == 50
    assert type(rebuilt.configure_optimizers()["optimizer"]) is torch.optim.AdamW
    assert upgrade_recipe(recipe) == recipe


@pytest.mark.parametrize("key", sorted(FLAT_KEYS))
def test_every_flat_key_moves_into_a_part(key):
    """Each flat argument of format 2 lands in one part (nothing is left at the top level)."""
    value = {"optimizer": "adamw", "lr_steps": [5], "draw_predictions": True}.get(key, 0.5)
    new = upgrade_recipe({"num_classes": 2, key: value})
    assert key not in new or key in ("optimizer",) and isinstance(new["optimizer"], dict)


def test_a_flat_key_is_one_line_naming_its_new_home(tmp_path, capsys):
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  lr_steps: [600, 750]\n")
    assert main(["fit", "-c", str(REPO / "configs" / "synth.yaml"), "-c", str(old)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"focaldet: error: config {old}: model.lr_steps is now model.lr_scheduler.init_args.milestones "
                   "(focaldet.engine.schedules.WarmupMultiStepLR) (the module takes parts: "
                   "docs/training.md#the-modules-parts)"]
    assert main(["fit", "-c", str(REPO / "configs" / "synth.yaml"), "--model.base_lr", "0.1"]) == 1
    assert "--model.base_lr: model.base_lr is now model.optimizer.init_args.lr" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="nonfinite"):
        RetinaNetModule(2, model=TINY, nonfinite="ignore")


def test_old_optimizer_names_and_sweep_keys_are_named_too():
    from focaldet.config.migrate import check_moved_keys
    from focaldet.tools.sweep import parse_param

    for args in (["--model.optimizer", "adamw"], ["--model.optimizer=sgd"]):
        with pytest.raises(ConfigError, match="model.optimizer is now a torch.optim class"):
            check_moved_keys([], args)
    check_moved_keys([], ["--model.optimizer", "torch.optim.AdamW", "--model.optimizer.lr", "1"])  # today's keys
    with pytest.raises(ConfigError, match=r"--param 'model.lr_steps=\[5\]': model.lr_steps is now"):
        parse_param("model.lr_steps=[5]")
    assert parse_param("model.optimizer.lr=0.1,0.2") == ("model.optimizer.lr", [0.1, 0.2])
    with pytest.raises(ConfigError, match="model.optimizer is now a torch.optim class"):  # before any cell runs
        parse_param("model.optimizer=torch.optim.SGD,adamw")
    assert parse_param("model.optimizer=torch.optim.SGD,torch.optim.AdamW")[1] == ["torch.optim.SGD", "torch.optim.AdamW"]
