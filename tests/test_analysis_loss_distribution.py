"""``focaldet analyze loss-distribution`` (the paper's Figure 4): the curve, the shares, the command."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import yaml

from focaldet.analysis.loss_distribution import (
    collect_logits,
    cumulative_loss_curve,
    focal_loss_per_example,
    hardest_share,
    sample_curve,
)
from focaldet.cli import main

pytestmark = pytest.mark.filterwarnings("ignore")


def test_cumulative_curve_matches_a_direct_computation():
    losses = np.array([3.0, 0.5, 0.0, 1.5, 5.0])
    frac, cum = cumulative_loss_curve(losses)
    np.testing.assert_allclose(frac, [0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(cum, np.array([0.0, 0.5, 2.0, 5.0, 10.0]) / 10.0)
    grid, sampled = sample_curve(frac, cum, points=11)
    np.testing.assert_allclose(grid, np.linspace(0, 1, 11))
    np.testing.assert_allclose(sampled[[0, 2, 4, 10]], [0.0, 0.0, 0.05, 1.0])
    np.testing.assert_allclose(sampled[1], 0.0)
    np.testing.assert_allclose(sampled[5], (0.05 + 0.2) / 2)  # halfway between the 2nd and 3rd example
    assert hardest_share(losses, 0.2) == pytest.approx(0.5)  # the hardest of 5 examples: 5 / 10
    assert hardest_share(losses, 0.4) == pytest.approx(0.8)
    assert hardest_share(losses, 0.05) == pytest.approx(0.5)  # at least one example


def test_focal_loss_per_example_is_the_formula():
    x = np.array([-3.0, -0.5, 0.0, 2.0])
    p = 1 / (1 + np.exp(-x))
    for gamma in (0.0, 2.0):
        np.testing.assert_allclose(focal_loss_per_example(x, True, gamma),
                                   -0.25 * (1 - p) ** gamma * np.log(p), rtol=1e-5)
        np.testing.assert_allclose(focal_loss_per_example(x, False, gamma),
                                   -0.75 * p ** gamma * np.log(1 - p), rtol=1e-5)


def test_larger_gamma_concentrates_the_negative_loss():
    rng = np.random.default_rng(0)
    logits = np.concatenate([rng.normal(-5, 1, 9500), rng.normal(0.5, 1, 500)])  # mostly easy negatives
    shares = [hardest_share(focal_loss_per_example(logits, False, g), 0.2) for g in (0, 0.5, 1, 2)]
    assert all(a < b for a, b in zip(shares, shares[1:])), shares
    assert shares[-1] > 0.999 and shares[0] < 0.95  # gamma 2: nearly all of it in the hardest 20 %


def test_collect_logits_takes_positives_at_their_class_and_samples_negatives():
    from focaldet.losses.criterion import RetinaNetCriterion

    class Model(torch.nn.Module):  # 4 fixed anchors, 2 classes, logits = 10 * anchor + class
        def normalize(self, images, sizes):
            return images

        def forward(self, images):
            n = images.shape[0]
            logits = (10 * torch.arange(4.0)[:, None] + torch.arange(2.0)).expand(n, 4, 2)  # (N, R, K)
            anchors = torch.tensor([[0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 12], [80, 80, 90, 90.0]])
            return {"cls_logits": [logits[:, :2], logits[:, 2:]], "box_deltas": [torch.zeros(n, 4, 4)],
                    "anchors": anchors}

    batch = {"images": torch.zeros(1, 3, 8, 8), "image_sizes": torch.tensor([[8, 8]]),
             "boxes": torch.tensor([[[0, 0, 10, 10.0]]]), "labels": torch.tensor([[1]])}
    dist = collect_logits(Model(), RetinaNetCriterion(), [batch])
    # anchors 0 and 2 (IoU 0.83) match the box of class 1; anchors 1 and 3 are background
    np.testing.assert_array_equal(np.sort(dist.positives), [1.0, 21.0])
    np.testing.assert_array_equal(np.sort(dist.negatives), [10.0, 11.0, 30.0, 31.0])
    sampled = collect_logits(Model(), RetinaNetCriterion(), [batch, batch], max_negatives=3, seed=1)
    assert sampled.negatives.size == 3 and sampled.num_background_logits == 8
    assert set(sampled.negatives) <= {10.0, 11.0, 30.0, 31.0}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, synth_coco):
    """A randomly initialised tiny model saved as `focaldet.load` reads it (no training) and its config."""
    from focaldet.data import CocoDataModule

    from helpers import save_untrained_checkpoint

    tmp = tmp_path_factory.mktemp("loss_dist")
    data = {"val_ann": str(synth_coco.val_ann), "val_images": str(synth_coco.images), "batch_size": 2,
            "min_size": 128, "max_size": 128}
    dm = CocoDataModule(**data)
    save_untrained_checkpoint(tmp / "tiny.ckpt", dm.label_map.to_dict(), dm.inputs.to_dict())
    cfg = tmp / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"data": data}))
    return tmp / "tiny.ckpt", cfg


def test_command_writes_the_png_and_the_csv(tiny_checkpoint, tmp_path, capsys):
    ckpt, cfg = tiny_checkpoint
    out = tmp_path / "fig4.png"
    assert main(["analyze", "loss-distribution", "-c", str(cfg), "--ckpt_path", str(ckpt),
                 "--gammas", "0,2", "--out", str(out), "--max-images", "2", "--max-negatives", "20000"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert [(r["panel"], float(r["gamma"])) for r in rows] == [
        ("positives", 0.0), ("positives", 2.0), ("negatives", 0.0), ("negatives", 2.0)]
    neg = rows[2:]
    assert all(int(r["examples"]) == 20000 for r in neg)
    for r in rows:
        curve = [float(r[f"cum_at_{g:.2f}"]) for g in np.linspace(0, 1, 101)]
        assert curve[0] == 0.0 and curve[-1] == pytest.approx(1.0) and np.all(np.diff(curve) >= -1e-9)
        assert 0 < float(r["hardest_5pct_share"]) <= float(r["hardest_20pct_share"]) <= 1
    assert float(neg[1]["hardest_20pct_share"]) > float(neg[0]["hardest_20pct_share"])
    assert "wrote" in capsys.readouterr().out


def test_missing_checkpoint_is_one_line(tiny_checkpoint, tmp_path, capsys):
    _, cfg = tiny_checkpoint
    missing = tmp_path / "nope.ckpt"
    assert main(["analyze", "loss-distribution", "-c", str(cfg), "--ckpt_path", str(missing),
                 "--out", str(tmp_path / "f.png")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"focaldet: error: {missing}: no such checkpoint"
    assert not (tmp_path / "f.png").exists()
