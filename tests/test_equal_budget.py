"""``focaldet equal-budget``: both libraries trained by one recipe, evaluated by one COCOeval."""

import contextlib
import io
import json
from pathlib import Path

import pytest

from helpers import ckpt_dir, tiny_config


def run_equal_budget(out: Path, synth, done: dict) -> dict:
    """``focaldet equal-budget`` of the tiny config for 3 steps into ``out/eb``: a background job
    (tests/background.py), in a process other than the tests'."""
    from focaldet.cli import main

    config = tiny_config(out, synth, **{"trainer.max_steps": 3, "trainer.val_check_interval": 3})
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = main(["equal-budget", "-c", str(config), "--out", str(out / "eb")])
    return {"status": status, "stderr": stderr.getvalue()[-3000:], "out": str(out / "eb")}


@pytest.mark.slow
def test_equal_budget_trains_both_and_reports_both_tables(equal_budget):
    assert equal_budget["status"] == 0, equal_budget["stderr"]
    out = Path(equal_budget["out"])
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"focaldet", "torchvision"}
    for side in report.values():
        assert len(side["stats"]) == 12 and set(side["per_class"]) == {"circle", "square", "triangle", "cross"}
    table = (out / "report.md").read_text()
    assert "| mAP |" in table and "| circle |" in table
    for side in ("focaldet", "torchvision"):  # each run keeps its own checkpoints and pictures
        assert list(ckpt_dir(out / side).glob("last*.ckpt"))
        assert list((out / side).rglob("val_pr_curves.png"))
