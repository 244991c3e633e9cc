"""EMA (configs/ema.yaml): the averaged weights are what validation during fit, best-*.ckpt,
``validate --ckpt_path`` and ``focaldet.load`` see; resuming keeps the average."""

from __future__ import annotations

import pytest
import torch

import focaldet
from focaldet.cli import FocaldetCLI, trainer_defaults
from focaldet.data import CocoDataModule
from focaldet.ema import EMA, ema_decay
from focaldet.errors import ConfigError
from focaldet.engine.module import RetinaNetModule

from helpers import REPO, ckpt_dir, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore")
EMA_CONFIG = REPO / "configs" / "ema.yaml"


def _cli(*args):
    return FocaldetCLI(RetinaNetModule, CocoDataModule, trainer_defaults=trainer_defaults(), args=list(args))


def test_decay_warms_up_to_its_cap():
    assert ema_decay(0, 0.9998, 2 / 3) == 0.0  # the first update copies the weights
    assert ema_decay(7, 0.9998, 2 / 3) == pytest.approx(1 - 8 ** (-2 / 3))  # 0.75
    assert ema_decay(10 ** 9, 0.9998, 2 / 3) == 0.9998
    assert ema_decay(torch.tensor(7), 0.9998, 2 / 3).item() == pytest.approx(0.75)
    assert ema_decay(3, 0.99, None) == 0.99
    with pytest.raises(ConfigError, match="decay must be in"):
        EMA(decay=1.0)


def fit_and_validate_with_ema(out, synth, done: dict) -> dict:
    """fit with EMA, then ``validate --ckpt_path best.ckpt`` and ``validate`` of the same file
    with its raw weights: what each logged (a background job, tests/background.py)."""
    cfg = tiny_config(out, synth, **{"trainer.max_steps": 20, "trainer.val_check_interval": 20,
                                     "model.optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.003}},
                                     "model.base_batch_size": 2, "model.lr_scheduler.init_args.warmup_iters": 5,
                                     "data.min_size": 96, "data.max_size": 128,
                                     # an undertrained model: keep every candidate (mAP > 0)
                                     "model.model.postprocess": {"class_path": "focaldet.models.PostProcess",
                                                                 "init_args": {"score_thresh": 0.0,
                                                                               "detections_per_img": 20}}})
    fit = _cli("fit", "-c", str(cfg), "-c", str(EMA_CONFIG))
    best = next(ckpt_dir(out / "run").glob("best-*.ckpt"))
    validate = _cli("validate", "-c", str(cfg), "--ckpt_path", str(best))
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    torch.save(dict(ckpt, state_dict=ckpt["current_model_state"]), out / "raw.ckpt")
    raw_run = _cli("validate", "-c", str(cfg), "--ckpt_path", str(out / "raw.ckpt"))
    return {"best": str(best),
            "fit": {k: float(fit.trainer.callback_metrics[k]) for k in ("val/mAP", "val/loss")},
            "validate": {"val/mAP": validate.model.last_eval.stats["mAP"],
                         "val/loss": float(validate.trainer.callback_metrics["val/loss"])},
            "raw": {"val/loss": float(raw_run.trainer.callback_metrics["val/loss"])}}


@pytest.mark.slow
def test_best_checkpoint_holds_the_average_that_validate_evaluates(ema_run):
    """fit with EMA: best.ckpt's state_dict is the average of the raw weights (they differ;
    the raw ones are kept in current_model_state); `validate --ckpt_path best.ckpt` gives the
    val/mAP and val/loss logged during fit; the raw weights give another val/loss."""
    ckpt = torch.load(ema_run["best"], map_location="cpu", weights_only=True)
    averaged, raw = ckpt["state_dict"], ckpt["current_model_state"]
    assert int(ckpt["averaging_state"]["n_averaged"]) == 20
    w = "model.head.cls_logits.weight"
    assert (averaged[w] - raw[w]).abs().max() > 1e-4  # the average is not the last weights

    logged, validated = ema_run["fit"], ema_run["validate"]
    assert validated["val/mAP"] == pytest.approx(logged["val/mAP"], abs=1e-6)
    assert validated["val/loss"] == pytest.approx(logged["val/loss"], rel=1e-5)
    det = focaldet.load(ema_run["best"], device="cpu")
    assert torch.equal(det.model.state_dict()["head.cls_logits.weight"], averaged[w])
    assert ema_run["raw"]["val/loss"] != pytest.approx(logged["val/loss"], rel=1e-3)


@pytest.mark.slow
def test_resuming_keeps_the_average(synth_coco, tmp_path, caplog):
    """4 steps, then resumed to 8: the average is restored from the checkpoint and goes on
    (8 updates, not 4 or a fresh copy of the resumed weights)."""
    caplog.set_level("INFO")
    cfg = tiny_config(tmp_path / "a", synth_coco, **{"trainer.max_steps": 4, "trainer.val_check_interval": 4,
                                                     "data.min_size": 64, "data.max_size": 64})
    _cli("fit", "-c", str(cfg), "-c", str(EMA_CONFIG))
    first = torch.load(ckpt_dir(tmp_path / "a" / "run") / "last.ckpt", map_location="cpu", weights_only=True)
    assert int(first["averaging_state"]["n_averaged"]) == 4
    _cli("fit", "-c", str(cfg), "-c", str(EMA_CONFIG), "--trainer.max_steps", "8", "--ckpt_path", "last")
    assert "Found current_model_state in the checkpoint" in caplog.text  # raw weights resumed, average restored
    resumed = torch.load(ckpt_dir(tmp_path / "a" / "run") / "last.ckpt", map_location="cpu", weights_only=True)
    assert int(resumed["averaging_state"]["n_averaged"]) == 8
