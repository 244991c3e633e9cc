"""Builders of the session's shared artifacts (`background.JOBS`): the tiny trained run, its
``.pt2`` and ONNX exports, a MobileNetV3 detector's ONNX export. Each is
``builder(out, synth, done) -> dict`` of JSON values (paths as strings)."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any

import torch

from helpers import ckpt_dir, tiny_config

TINY_LOW_THRESH = {"class_path": "focaldet.models.PostProcess",
                   "init_args": {"score_thresh": 0.02, "detections_per_img": 30}}


def fit_tiny_run(out: Path, synth, done: dict) -> dict[str, str]:
    """``focaldet fit`` of the tiny config for 40 AdamW steps at 96-128 px (batches of 3),
    keeping detections down to score 0.02: ``{"cfg", "ckpt" (last.ckpt), "root"}``."""
    from focaldet.cli import main

    cfg = tiny_config(out, synth, **{"trainer.max_steps": 40, "trainer.val_check_interval": 40,
                                     "model.optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.001}},
                                     "model.base_batch_size": 2, "model.lr_scheduler.init_args.warmup_iters": 5,
                                     "model.model.postprocess": TINY_LOW_THRESH,
                                     "data.min_size": 96, "data.max_size": 128, "data.batch_size": 3})
    assert main(["fit", "-c", str(cfg)]) == 0
    return {"cfg": str(cfg), "ckpt": str(ckpt_dir(out / "run") / "last.ckpt"), "root": str(out)}


def _export(ckpt: str, fmt: str, path: Path) -> dict[str, Any]:
    """``focaldet export --ckpt_path CKPT --format FMT --output PATH``: ``{"path", "stdout", "status"}``."""
    from focaldet.export.cli import main as export_main

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = export_main(["--ckpt_path", ckpt, "--format", fmt, "--output", str(path)])
    return {"path": str(path), "stdout": stdout.getvalue(), "status": status}


def export_tiny_pt2(out: Path, synth, done: dict) -> dict[str, Any]:
    """The tiny run's checkpoint through ``focaldet export --format torch_export``."""
    return _export(done["tiny_run"]["ckpt"], "torch_export", out / "model.pt2")


def export_tiny_onnx(out: Path, synth, done: dict) -> dict[str, Any]:
    """The tiny run's checkpoint through ``focaldet export --format onnx``."""
    return _export(done["tiny_run"]["ckpt"], "onnx", out / "model.onnx")


def mobilenet_detector():
    """A MobileNetV3-Large RetinaNet (frozen BN, 3 classes, 128 px) with seed-0 weights and a
    cls bias of -2 (enough detections to compare): the same model wherever it is built."""
    from focaldet.models import RetinaNet, TorchvisionBackbone

    torch.manual_seed(0)
    model = RetinaNet(3, backbone=TorchvisionBackbone("mobilenet_v3_large", norm="frozen_bn"), fpn_channels=32,
                      num_convs=1, min_size=128, max_size=128).eval()
    with torch.no_grad():
        model.head.cls_logits.bias.fill_(-2.0)
    return model


def export_mobilenet(out: Path, synth, done: dict) -> dict[str, str]:
    """`mobilenet_detector` through `focaldet.export.export_onnx` (category ids 1, 2, 3)."""
    from focaldet.export import export_onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_onnx(mobilenet_detector(), [1, 2, 3], ["a", "b", "c"], out / "mnv3.onnx")
    return {"path": str(path)}
