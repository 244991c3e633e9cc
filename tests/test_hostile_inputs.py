"""The rest of what hostile inputs found (issue 20, section 5): each input that broke a command
is now one line naming what is wrong, before any work is done."""

from __future__ import annotations


import pytest
import torch

from focaldet.cli import main
from focaldet.errors import ConfigError
from focaldet.export.core import ExportError, check_output
from focaldet.losses import RetinaNetCriterion
from focaldet.output_paths import check_output_file

from helpers import tiny_config

pytestmark = pytest.mark.filterwarnings("ignore")


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error printed"
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def test_export_checks_its_output_before_the_work(tmp_path, capsys):
    with pytest.raises(ExportError, match=rf"output {tmp_path} is a folder"):
        check_output(tmp_path, "onnx")
    with pytest.raises(ExportError, match="/dev/null is not a folder"):
        check_output("/dev/null/model.onnx", "onnx")
    from focaldet.export.cli import main as export_main

    # a checkpoint that does not exist: the output is refused first, before reading it (the slow part)
    assert export_main(["--ckpt_path", str(tmp_path / "none.ckpt"), "--output", str(tmp_path)]) == 1
    assert "is a folder" in _error_line(capsys)


def test_check_output_file(tmp_path):
    assert check_output_file(tmp_path / "new" / "a.json") == tmp_path / "new" / "a.json"
    assert (tmp_path / "new").is_dir()
    with pytest.raises(ConfigError, match="is a folder"):
        check_output_file(tmp_path / "new")
    with pytest.raises(ConfigError, match="output folder .* does not exist"):
        check_output_file(tmp_path / "nope" / "a.json", create_parent=False)


@pytest.mark.parametrize("out,message", [("FOLDER", "is a folder"), ("/dev/null/noisy.json", "is not a folder")])
def test_data_corrupt_refuses_an_unwritable_out(synth_coco, tmp_path, capsys, out, message):
    out = str(tmp_path) if out == "FOLDER" else out
    assert main(["data", "corrupt", str(synth_coco.train_ann), "--out", out, "--seed", "0"]) == 1
    line = _error_line(capsys)
    assert "corrupt: error: --out " in line and message in line


def test_data_corrupt_refuses_infinite_jitter(synth_coco, tmp_path, capsys):
    out = tmp_path / "noisy.json"
    for value in ("inf", "nan", "-1"):
        assert main(["data", "corrupt", str(synth_coco.train_ann), "--out", str(out), "--seed", "0",
                     "--jitter-boxes", value]) == 1
        assert "--jitter-boxes must be >= 0 and finite" in _error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--min-size", "--max-size"])
def test_data_anchors_refuses_a_zero_size(synth_coco, capsys, flag):
    assert main(["data", "anchors", str(synth_coco.train_ann), flag, "0"]) == 1
    assert f"{flag} must be >= 1 pixel, got 0" in _error_line(capsys)


def test_a_module_that_is_no_loss_is_refused_at_construction():
    with pytest.raises(ConfigError, match=r"model.criterion.cls_loss: torch.nn.modules.linear.Identity is not a class loss"):
        RetinaNetCriterion(torch.nn.Identity())
    with pytest.raises(ConfigError, match=r"model.criterion.box_loss: .*ReLU is not a box loss"):
        RetinaNetCriterion(None, torch.nn.ReLU())
    RetinaNetCriterion(None, torch.nn.SmoothL1Loss())  # (input, target): fits a box loss call


@pytest.mark.slow
def test_cli_errors_from_a_part_constructor_are_one_line(synth_coco, tmp_path, capsys):
    """A bad backbone weights file and ``torch.nn.Identity`` as the class loss: one line each
    (were two chained tracebacks, and an error mid-step)."""
    cfg = tiny_config(tmp_path, synth_coco)
    bad = tmp_path / "bad.pth"
    bad.write_text("garbage")
    assert main(["validate", "-c", str(cfg), "--model.model.backbone.weights", str(bad)]) == 1
    line = _error_line(capsys)
    assert line.startswith(f"focaldet: error: weights file {bad}: not a readable PyTorch file"), line
    assert main(["validate", "-c", str(cfg), "--model.criterion.cls_loss", "torch.nn.Identity"]) == 1
    assert "model.criterion.cls_loss: torch.nn.modules.linear.Identity is not a class loss" in _error_line(capsys)
