"""One training run from Python: build, fit, evaluate on the val split, return the numbers.

The run builder shared by ``focaldet equal-budget`` and ``focaldet sweep``. A run is what
``focaldet fit -c CONFIG [ARGS]`` builds (``FocaldetCLI(run=False)``: the same parser,
defaults, links and callbacks), followed by one ``validate`` of the final weights::

    from focaldet.engine.runs import train_and_evaluate
    result = train_and_evaluate(["configs/study_synth.yaml"], ["--trainer.max_steps", "50"], "runs/x")
    result.stats["mAP"], result.per_class["circle"], result.steps, result.wall_s
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L

from focaldet.errors import ConfigError, NonFiniteLossError

__all__ = ["RunResult", "build_run", "fit_and_evaluate", "resolve_run_config", "train_and_evaluate"]


@dataclass
class RunResult:
    """The outcome of one run.

    Attributes:
        stats: the 12 COCOeval numbers (``focaldet.evaluation.STAT_NAMES``), -1 where not computable.
        per_class, per_class_ap50: class name -> AP@[.5:.95] / AP@.5 (nan: no ground truth).
        steps: optimiser steps taken (``trainer.global_step``).
        train_s: wall time of ``fit``; wall_s: of ``fit`` + the final ``validate``.
    """

    stats: dict[str, float]
    per_class: dict[str, float]
    per_class_ap50: dict[str, float]
    steps: int
    train_s: float
    wall_s: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunResult:
        return cls(**{k: d[k] for k in ("stats", "per_class", "per_class_ap50", "steps", "train_s", "wall_s")})


def checked_argv(configs: Sequence[str], args: Sequence[str]) -> tuple[list[str], bool]:
    """``(the command line of focaldet fit -c C1 ... ARGS, whether --trust_checkpoint_code was
    given)``, after each config was read and its class paths checked: a missing or malformed
    config, or a class path outside the allow-list, is a one-line `ConfigError` naming the file
    (a refused class is never imported)."""
    from focaldet.config.recipe import read_config_file
    from focaldet.engine.lightning_cli import check_configs, trusted

    args, trust = trusted(args)
    for config in configs:
        read_config_file(config)  # missing or malformed: named before anything else
    check_configs(configs, args, trust)
    return [a for c in configs for a in ("-c", str(c))] + args, trust


def build_run(configs: Sequence[str], args: Sequence[str] = (), root_dir: str | Path | None = None,
              module_class: type | None = None):
    """The ``FocaldetCLI`` (model, datamodule, trainer) that ``focaldet fit -c C1 -c C2 ... ARGS``
    would run; ``root_dir`` overrides ``trainer.default_root_dir``. ``module_class`` (default
    ``RetinaNetModule``) may be a subclass with the same constructor, e.g. the torchvision twin.
    A bad argument raises ``ConfigError`` (one line) instead of exiting. ``args`` may hold
    ``--trust_checkpoint_code``."""
    from jsonargparse import ArgumentError

    from focaldet.config.safe_load import import_policy
    from focaldet.data.datamodule import CocoDataModule
    from focaldet.engine.lightning_cli import PARSER_KWARGS, cli_class, trainer_defaults
    from focaldet.engine.module import RetinaNetModule

    argv, trust = checked_argv(configs, args)
    if root_dir is not None:
        argv += ["--trainer.default_root_dir", str(root_dir)]
    # configured through LightningCLI(args=...), not through sys.argv
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    try:
        with import_policy(trust):
            return cli_class(trust)(module_class or RetinaNetModule, CocoDataModule,
                                    trainer_defaults=trainer_defaults(), run=False,
                                    save_config_kwargs={"overwrite": True},
                                    parser_kwargs={"exit_on_error": False, **PARSER_KWARGS}, args=argv)
    except ArgumentError as e:
        raise ConfigError(f"bad run arguments: {' '.join(str(e).split())}") from None


def resolve_run_config(configs: Sequence[str], args: Sequence[str] = ()) -> str:
    """The YAML of the configuration ``focaldet fit -c C1 ... ARGS`` would run (defaults filled,
    values typed: ``--model.optimizer.lr 1`` and ``1.0`` give the same text), parsed only: no model,
    data or trainer is built. A bad argument raises ``ConfigError`` as in :func:`build_run`."""
    from jsonargparse import ArgumentError

    from focaldet.engine.lightning_cli import FocaldetCLI, trainer_defaults
    from focaldet.data.datamodule import CocoDataModule
    from focaldet.engine.module import RetinaNetModule

    class _Resolved(Exception):
        pass

    class _ParseOnly(FocaldetCLI):
        def instantiate_classes(self) -> None:
            raise _Resolved(self._resolved)  # set by FocaldetCLI.before_instantiate_classes

    from focaldet.config.safe_load import import_policy

    argv, trust = checked_argv(configs, args)  # as build_run: a refused class path is never imported
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    try:
        with import_policy(trust):
            _ParseOnly(RetinaNetModule, CocoDataModule, trainer_defaults=trainer_defaults(), run=False,
                       parser_kwargs={"exit_on_error": False}, args=argv)
    except _Resolved as resolved:
        return resolved.args[0]
    except ArgumentError as e:
        raise ConfigError(f"bad run arguments: {' '.join(str(e).split())}") from None
    raise AssertionError("FocaldetCLI did not reach instantiate_classes")


def fit_and_evaluate(cli, module=None) -> RunResult:
    """Fit ``module`` (default ``cli.model``) on ``cli.datamodule`` with ``cli.trainer``, then
    validate the final weights. Seeds first (``seed_everything`` of the config), so that two
    runs of one config see the same data order and augmentation. A run whose loss or metrics
    are not finite raises ``NonFiniteLossError``."""
    module = cli.model if module is None else module
    L.seed_everything(cli.config.get("seed_everything", 0))
    start = time.perf_counter()
    cli.trainer.fit(module, cli.datamodule)
    train_s = time.perf_counter() - start
    cli.trainer.validate(module, cli.datamodule, verbose=False)
    wall_s = time.perf_counter() - start
    ev = module.last_eval
    if ev is None:
        raise ConfigError("the run's validation produced no COCO evaluation (is data.val_ann set?)")
    if not all(math.isfinite(v) for v in ev.stats.values()):
        raise NonFiniteLossError(f"non-finite COCO metrics after {cli.trainer.global_step} steps: {ev.stats}")
    return RunResult(stats=dict(ev.stats), per_class=dict(ev.per_class), per_class_ap50=dict(ev.per_class_ap50),
                     steps=int(cli.trainer.global_step), train_s=train_s, wall_s=wall_s)


def train_and_evaluate(configs: Sequence[str], args: Sequence[str] = (), root_dir: str | Path | None = None,
                       module_class: type | None = None) -> RunResult:
    """:func:`build_run` then :func:`fit_and_evaluate`."""
    return fit_and_evaluate(build_run(configs, args, root_dir, module_class))
