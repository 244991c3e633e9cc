"""Helpers shared by the CLI tests: a tiny, fast training config over a synthetic set."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path: Path, data, **overrides) -> Path:
    """A YAML config that trains a ~1M-parameter RetinaNet on 128 px images in ~0.1 s/step."""
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 4, "val_check_interval": 4,
            "check_val_every_n_epoch": None, "log_every_n_steps": 1, "enable_progress_bar": False,
            "enable_model_summary": False, "default_root_dir": str(tmp_path / "run"),
        },
        "model": {
            "model": {"backbone": {"class_path": "focaldet.models.ResNetBackbone",
                                   "init_args": {"depth": 18, "norm": "frozen_bn", "freeze_at": 0}},
                      "fpn_channels": 32, "num_convs": 1},
            "lr_scheduler": {"init_args": {"warmup_iters": 2}},
        },
        "data": {
            "train_ann": str(data.train_ann), "train_images": str(data.images),
            "val_ann": str(data.val_ann), "val_images": str(data.images),
            "batch_size": 2, "num_workers": 0, "min_size": 128, "max_size": 128,
        },
    }
    for key, value in overrides.items():  # "model.model.fpn_channels": 64 sets cfg["model"]["model"]["fpn_channels"]
        *parents, name = key.split(".")
        node = cfg
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = value
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """``focaldet ARGS`` in a process of its own, forked with the imports done (`warm.start_cli`:
    for DDP, kill and exit-code tests); ``env`` adds variables."""
    from warm import start_cli

    return start_cli(*args, cwd=cwd, env=env).result(timeout)


def _run_sequence(argvs: list[list[str]], out: str) -> int:
    """`run_cli_sequence`'s process: each command in turn, what it printed and its exit code to ``out`` (JSON)."""
    import contextlib
    import io
    import json
    import traceback

    from focaldet.cli import main

    results = []
    for argv in argvs:
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = main(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                traceback.print_exc()
                code = 1
        results.append({"args": argv, "returncode": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()})
    Path(out).write_text(json.dumps(results))
    return 0


def run_cli_sequence(argvs: list[list[str]], cwd: Path | None = None, timeout: float = 600
                     ) -> list[subprocess.CompletedProcess]:
    """``focaldet ARGS`` for each of ``argvs`` in turn, in ONE process of its own (forked with
    the imports done: for commands that must not run in the test process but need no process
    each). Each result carries the command's exit code and what it printed; a command that
    raises prints its traceback to its stderr and counts as exit 1."""
    import json
    import tempfile

    from warm import run_in_child

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        proc = run_in_child(_run_sequence, argvs, str(out), cwd=cwd).result(timeout)
        assert proc.returncode == 0 and out.exists(), proc.stderr[-3000:]
        return [subprocess.CompletedProcess(r["args"], r["returncode"], r["stdout"], r["stderr"])
                for r in json.loads(out.read_text())]


def save_untrained_checkpoint(path: Path, label_map: dict, inputs: dict, fpn_channels: int = 32,
                              postprocess=None, edit_recipe=None, **module_kwargs) -> Path:
    """The one builder of an untrained checkpoint for the tests that need a checkpoint file but
    not a trained model: a ResNet-18 RetinaNet (frozen BN, one head conv, seed 0) saved as
    Lightning saves a ``RetinaNetModule``. ``edit_recipe(recipe) -> recipe`` changes the stored
    recipe (a hostile or an old-format one); ``module_kwargs`` go to the module."""
    import copy
    from functools import partial

    import lightning
    import torch

    from focaldet.engine.module import RetinaNetModule
    from focaldet.models import ResNetBackbone, RetinaNet

    torch.manual_seed(0)
    model = partial(RetinaNet, backbone=ResNetBackbone(18, freeze_at=0), fpn_channels=fpn_channels, num_convs=1,
                    postprocess=postprocess)
    module = RetinaNetModule(len(label_map["cat_ids"]), model=model, label_map=label_map, inputs=inputs,
                             **module_kwargs)
    recipe = copy.deepcopy(dict(module.hparams))
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": edit_recipe(recipe) if edit_recipe else recipe,
            "pytorch-lightning_version": lightning.__version__, "epoch": 0, "global_step": 0}
    module.on_save_checkpoint(ckpt)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def first_batch_error(loader) -> BaseException:
    """The exception ``next(iter(loader))`` raises (the test fails when none). Its traceback,
    which holds the iterator, is dropped here, and the iterator with it: freed later by a
    garbage collection, an iterator whose worker raised makes torch wait its 5 s poll for that
    worker, in whichever test runs then."""
    import pytest

    iterator = iter(loader)
    try:
        next(iterator)
    except Exception as e:
        error = e
    else:
        pytest.fail("the first batch raised nothing")
    cause = error
    while cause is not None:  # the chain's tracebacks hold the iterator's frames
        cause.__traceback__ = None
        cause = cause.__cause__ or cause.__context__
    del iterator
    return error


def ckpt_dir(run_dir: Path) -> Path:
    """The checkpoint folder of the newest run under ``run_dir`` (``trainer.default_root_dir``):
    each run writes its own, ``lightning_logs/version_N/checkpoints``."""
    from focaldet.engine.checkpoints import run_checkpoint_dirs

    found = run_checkpoint_dirs(run_dir)
    assert found, f"no checkpoint under {run_dir}"
    return found[0]
