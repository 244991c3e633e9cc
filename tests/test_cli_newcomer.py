"""What a newcomer meets at the command line: the command list, refused abbreviations, no
stray warnings, one folder (with its checkpoints) per run, ``--ckpt_path last`` that says
where it looked, and ``data check -c`` at the config's size."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import yaml

from focaldet.engine.checkpoints import CheckpointWarning
from focaldet.cli import COMMANDS, main, run

from helpers import REPO, tiny_config

ALL_COMMANDS = ("fit", "validate", "test", "predict", "data", "export", "serve", "bench", "sweep", "analyze",
                "equal-budget")


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert set(lines) == set(ALL_COMMANDS) == set(COMMANDS)
    assert all(len(line.split()) > 2 for line in lines.values())  # each with its one line
    assert main([]) == 2 and "commands:" in capsys.readouterr().out


def test_an_unknown_command_is_one_line(capsys):
    assert main(["fitt"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["focaldet: error: unknown command 'fitt'; the commands: " + ", ".join(ALL_COMMANDS)
                   + " (focaldet --help)"]


def test_the_table_names_a_function_for_every_command():
    import importlib

    for name, (target, _) in COMMANDS.items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name


def test_a_reader_that_leaves_early_gets_no_traceback():
    """``focaldet --help | head -0``: the pipe closes before the help is written."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "focaldet.cli", "--help"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) in (0, 1) and "Traceback" not in err and "BrokenPipe" not in err, err


@pytest.mark.parametrize("command", ["data", "export", "serve", "bench", "sweep", "analyze", "equal-budget"])
def test_every_command_answers_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        run([command, "--help"])
    assert exit_.value.code == 0 and "usage: focaldet" in capsys.readouterr().out


def test_lightning_commands_refuse_abbreviations(tmp_path, synth_coco, capsys):
    cfg = tiny_config(tmp_path, synth_coco)
    with pytest.raises(SystemExit) as exit_:
        run(["fit", "-c", str(cfg), "--trainer.max_step", "10", "--print_config"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --trainer.max_step 10" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the full name works
        run(["fit", "-c", str(cfg), "--trainer.max_steps", "10", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["trainer"]["max_steps"] == 10


@pytest.mark.parametrize("argv, wrong", [
    (["data", "split", "a.json", "--va", "0.2", "--out", "x"], "--va"),
    (["data", "synth", "--ou", "x"], "--ou"),
    (["sweep", "-c", "a.yaml", "--para", "model.x=1,2", "--out", "x"], "--para"),
    (["export", "--ckpt", "a.ckpt", "--output", "m.onnx"], "--ckpt"),
    (["serve", "--ckpt", "a.ckpt"], "--ckpt"),
    (["analyze", "loss-distribution", "-c", "a.yaml", "--ckpt", "a.ckpt"], "--ckpt"),
])
def test_argparse_commands_refuse_abbreviations(argv, wrong, capsys, monkeypatch):
    import focaldet.engine.runs

    monkeypatch.setattr(focaldet.engine.runs, "build_run", lambda *a, **k: pytest.fail("must not run"))
    with pytest.raises(SystemExit) as exit_:
        run(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert wrong in err and ("unrecognized arguments" in err or "required" in err), err


def test_options_passed_on_to_the_runs_refuse_abbreviations(tmp_path, synth_coco, capsys):
    """equal-budget and sweep hand unknown options to the runs' parser, which refuses them too."""
    cfg = tiny_config(tmp_path, synth_coco)
    assert main(["equal-budget", "-c", str(cfg), "--ou", str(tmp_path / "x"), "--trainer.max_steps", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("focaldet: error: bad run arguments") and "--ou" in err[-1]
    assert not (tmp_path / "x").exists()


def test_no_lightning_args_warning(tmp_path, synth_coco, capsys):
    """Lightning warns when LightningCLI gets ``args`` while sys.argv has arguments (pytest's here):
    focaldet always passes its argv explicitly, so the warning never applies."""
    cfg = tiny_config(tmp_path, synth_coco)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(SystemExit):
            run(["fit", "-c", str(cfg), "--print_config"])
    assert not [w for w in caught if "args parameter" in str(w.message)]


@pytest.mark.slow
def test_each_run_gets_its_own_folder_and_last_resumes_the_newest(tmp_path, synth_coco, capsys):
    cfg = tiny_config(tmp_path, synth_coco, **{"trainer.max_steps": 2, "trainer.limit_val_batches": 0})
    root = tmp_path / "run"
    with pytest.warns(CheckpointWarning, match=f"--ckpt_path last: no checkpoint found in {root}/lightning_logs/"
                                               rf"version_\*/checkpoints and {root}/checkpoints; training starts"):
        assert main(["fit", "-c", str(cfg), "--ckpt_path", "last"]) == 0  # nothing yet: starts afresh
    assert main(["fit", "-c", str(cfg)]) == 0
    first, second = (root / "lightning_logs" / f"version_{i}" / "checkpoints" for i in (0, 1))
    assert sorted(p.name for p in first.glob("*.ckpt")) == sorted(p.name for p in second.glob("*.ckpt"))
    assert (first / "last.ckpt").is_file() and not list(root.rglob("last-v*.ckpt"))  # no shared folder
    assert not (root / "checkpoints").exists()

    # resuming: the newest run's last.ckpt (version_1, at step 2) -> trains on to 4 in its own folder
    assert main(["fit", "-c", str(cfg), "--trainer.max_steps", "4", "--ckpt_path", "last"]) == 0
    third = root / "lightning_logs" / "version_2" / "checkpoints"
    ckpt = torch.load(third / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4
    assert torch.load(second / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 2  # kept

    # validate finds the newest run's checkpoint too
    capsys.readouterr()
    assert main(["validate", "-c", str(cfg), "--ckpt_path", "last", "--trainer.limit_val_batches", "1"]) == 0
    assert "COCO bbox evaluation" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["validate", "test", "predict"])
def test_last_with_no_checkpoint_names_the_folders_it_searched(tmp_path, synth_coco, capsys, command):
    cfg = tiny_config(tmp_path, synth_coco)
    extra = {"test": ["--data.test_ann", str(synth_coco.val_ann), "--data.test_images", str(synth_coco.images)],
             "predict": ["--data.predict_images", str(synth_coco.images)]}.get(command, [])
    capsys.readouterr()
    assert main([command, "-c", str(cfg), "--ckpt_path", "last", *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    root = tmp_path / "run"
    assert err[-1] == (f"focaldet: error: --ckpt_path last: no checkpoint found in {root}/lightning_logs/version_*/"
                       f"checkpoints and {root}/checkpoints (trainer.default_root_dir {root})")


def test_data_check_reports_anchor_coverage_at_the_configs_size(tmp_path, synth_coco):
    """``data check -c CFG`` uses the config's anchors and eval size: the same numbers as the
    doctor called with them, and other numbers than the defaults (800 px, COCO anchors)."""
    from focaldet.data.doctor import check_dataset
    from focaldet.models import AnchorGenerator

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"model": {"anchor_generator": {"class_path": "focaldet.models.AnchorGenerator",
                                                 "init_args": {"sizes": [64, 128, 256, 512, 1024]}}}},
        "data": {"min_size": [96, 112, 128], "max_size": 128}}))
    out = tmp_path / "report.json"
    main(["data", "check", str(synth_coco.train_ann), "-c", str(cfg), "--json", str(out)])
    report = json.loads(out.read_text())
    assert (report["min_size"], report["max_size"]) == (128, 128)  # the largest training size: the eval size
    expected = check_dataset(synth_coco.train_ann, min_size=128, max_size=128,
                             anchor_generator=AnchorGenerator(sizes=[64, 128, 256, 512, 1024]))
    assert report["anchor_coverage"] == pytest.approx(expected.anchor_coverage)
    default = check_dataset(synth_coco.train_ann)
    assert report["anchor_coverage"] != pytest.approx(default.anchor_coverage)
    main(["data", "check", str(synth_coco.train_ann), "-c", str(cfg), "--min-size", "64", "--json", str(out)])
    assert json.loads(out.read_text())["min_size"] == 64  # the command line wins

    bccd = REPO / "configs" / "bccd.yaml"  # sized in its eval_transforms: 256 / 512
    main(["data", "check", str(synth_coco.train_ann), "-c", str(bccd), "--json", str(out)])
    assert (json.loads(out.read_text())["min_size"], json.loads(out.read_text())["max_size"]) == (256, 512)
