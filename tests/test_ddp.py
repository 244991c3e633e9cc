"""The multi-GPU code paths, exercised with 2 CPU processes (gloo)."""

import csv
from pathlib import Path

import pytest
import torch

from focaldet.data.synth import write_synthetic_coco

from helpers import run_cli, tiny_config

pytestmark = pytest.mark.slow
DDP = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"]


def _val_metrics(run: Path) -> dict[str, float]:
    rows = list(csv.DictReader((next((run / "lightning_logs").iterdir()) / "metrics.csv").open()))
    return {k: float(v) for row in rows for k, v in row.items() if k.startswith("val/") and v}


def test_validate_on_two_processes_equals_one(tmp_path):
    # 5 val images: not a multiple of 2 processes x 2 images, so DistributedSampler repeats one
    data = write_synthetic_coco(tmp_path / "data", num_images=20, seed=3, num_classes=3, image_size=128,
                                val_fraction=0.25)
    low_thresh = tmp_path / "untrained.yaml"  # random weights: keep many candidates so metrics are > 0
    low_thresh.write_text("model:\n  prior_prob: 0.2\n  postprocess:\n    class_path: focaldet.models.PostProcess\n"
                          "    init_args: {score_thresh: 0.0}\n")
    metrics = {}
    for name, extra in [("one", []), ("two", DDP)]:
        cfg = tiny_config(tmp_path / name, data)
        proc = run_cli("validate", "-c", str(cfg), "-c", str(low_thresh), *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        metrics[name] = _val_metrics(tmp_path / name / "run")
    assert metrics["one"]["val/AR100"] > 0
    # the COCO numbers (12 + per-class AP) are exact; val/loss averages over the sampler's
    # padded repeats, so it may differ in DDP
    coco = {k: v for k, v in metrics["one"].items() if not k.startswith("val/loss")}
    assert len([k for k in coco if k.count("/") == 1]) == 12
    assert {k: v for k, v in metrics["two"].items() if not k.startswith("val/loss")} == coco
    assert {"val/loss", "val/loss_cls", "val/loss_box"} <= set(metrics["two"])


def test_one_step_two_processes_equals_one_process_two_images(tmp_path):
    """2 processes x 1 image == 1 process x 2 images: proves the all-reduced loss normaliser
    (and the linear lr scaling by global batch)."""
    data = write_synthetic_coco(tmp_path / "data", num_images=3, seed=5, num_classes=3, image_size=128,
                                val_fraction=0.34)  # 2 train images
    weights = {}
    for name, extra in [("one", ["--data.batch_size", "2"]), ("two", ["--data.batch_size", "1", *DDP])]:
        cfg = tiny_config(tmp_path / name, data, **{"trainer.max_steps": 1, "trainer.limit_val_batches": 0})
        proc = run_cli("fit", "-c", str(cfg), "--data.hflip_prob", "0", "--model.warmup_iters", "0",
                       "--model.base_lr", "0.5", *extra)  # a large lr makes the update dominate
        assert proc.returncode == 0, proc.stderr[-3000:]
        ckpt = torch.load(tmp_path / name / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert ckpt["global_step"] == 1
        weights[name] = ckpt["state_dict"]
    moved = 0.0
    for key, w1 in weights["one"].items():
        torch.testing.assert_close(weights["two"][key], w1, atol=1e-5, rtol=1e-4, msg=key)
        if key == "model.head.cls_logits.bias":
            moved = (w1 + 4.59512).abs().max().item()  # initial bias is -log(99)
    assert moved > 1e-3  # the step really changed the weights
