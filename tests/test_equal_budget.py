"""``focaldet equal-budget``: both libraries trained by one recipe, evaluated by one COCOeval."""

import json

import pytest

from helpers import ckpt_dir, run_cli, tiny_config


@pytest.mark.slow
def test_equal_budget_trains_both_and_reports_both_tables(tmp_path, synth_coco):
    config = tiny_config(tmp_path, synth_coco, **{"trainer.max_steps": 3, "trainer.val_check_interval": 3})
    out = tmp_path / "eb"
    proc = run_cli("equal-budget", "-c", str(config), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"focaldet", "torchvision"}
    for side in report.values():
        assert len(side["stats"]) == 12 and set(side["per_class"]) == {"circle", "square", "triangle", "cross"}
    table = (out / "report.md").read_text()
    assert "| mAP |" in table and "| circle |" in table
    for side in ("focaldet", "torchvision"):  # each run keeps its own checkpoints and pictures
        assert list(ckpt_dir(out / side).glob("last*.ckpt"))
        assert list((out / side).rglob("val_pr_curves.png"))
