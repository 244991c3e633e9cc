"""``focaldet fit|validate|test|predict``: Lightning's ``LightningCLI`` over ``RetinaNetModule``
and ``CocoDataModule`` (`FocaldetCLI`), its callbacks and trainer defaults, and the rules that
put a checkpoint's config first and keep files from strangers from running code.

`focaldet.cli` imports this only for those four commands, so ``focaldet data ...`` and the
other tools never import Lightning.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from focaldet.engine.checkpoints import check_checkpoint, install_checkpoint_io, resolve_last
from focaldet.data.datamodule import CocoDataModule
from focaldet.errors import FocaldetError
from focaldet.engine.stop_all_ranks import StopAllRanks
from focaldet.engine.loggers import default_logger
from focaldet.engine.module import MODEL_SET_BY_MODULE, RetinaNetModule


class PredictionWriter(Callback):
    """Writes ``focaldet predict``'s detections as one COCO-style results JSON
    (``predictions.json`` in the run directory), with file and category names added."""

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        from focaldet.evaluation import gather_results, write_results_json

        batches = trainer.predict_loop.predictions
        entries = gather_results([e for batch in batches for e in batch])
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective: every rank
        if trainer.is_global_zero:
            path = write_results_json(entries, run_dir / "predictions.json")
            print(f"wrote {len(entries)} detections to {path}", flush=True)


class TrainingSpeed(Callback):
    """Prints the sustained training speed when ``fit`` ends: ``training speed: X images/s``.

    Images are counted on every process (each step's local batch x world size) after the
    first ``warmup`` steps (allocator growth, cuDNN autotuning, compilation), and timed
    between two device synchronisations: data loading, optimiser steps and logging are
    included, validation is not. ``images_per_second`` keeps the figure (None if the run
    had no step after the warm-up).
    """

    def __init__(self, warmup: int = 5) -> None:
        if warmup < 1:
            raise ValueError(f"TrainingSpeed: warmup must be >= 1 step, got {warmup}")
        self.warmup = warmup
        self._reset()

    def _reset(self) -> None:
        self._steps, self._images, self._elapsed, self._since = 0, 0, 0.0, None
        self.images_per_second: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._reset()

    def _clock(self, pl_module) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._steps += 1
        if self._steps > self.warmup:
            self._images += len(batch["images"]) * trainer.world_size
        elif self._steps == self.warmup:
            self._since = self._clock(pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._since is not None:  # validation inside fit: pause the clock
            self._elapsed += self._clock(pl_module) - self._since
            self._since = None

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and self._steps >= self.warmup:
            self._since = self._clock(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._since is not None:
            self._elapsed += self._clock(pl_module) - self._since
        if self._images == 0 or self._elapsed <= 0:
            return
        self.images_per_second = self._images / self._elapsed
        if trainer.is_global_zero:
            print(f"training speed: {self.images_per_second:.1f} images/s over steps {self.warmup + 1}-{self._steps} "
                  f"({trainer.world_size} process(es), validation excluded)", flush=True)


def without_module_settings(config):
    """A copy of a run's config without the model arguments the module sets itself (the
    classes, the background logit, the eval resize: `MODEL_SET_BY_MODULE`): jsonargparse fills
    them with RetinaNet's defaults (``min_size: 800``), which would otherwise show beside the
    data's real settings."""
    config = config.clone()
    init_args = config.get("model.model.init_args")
    for key in MODEL_SET_BY_MODULE if init_args is not None else ():
        if key in init_args:
            del init_args[key]
    return config


class FocaldetArgumentParser(LightningArgumentParser):
    """Lightning's parser whose dumps (``--print_config``, a run's ``config.yaml``, the run
    config a checkpoint stores) leave out the model arguments the module sets itself
    (`without_module_settings`)."""

    def dump(self, cfg, *args, **kwargs) -> str:
        return super().dump(without_module_settings(cfg), *args, **kwargs)


class FocaldetCLI(LightningCLI):
    """LightningCLI whose data module tells the model its classes (never typed twice).

    ``trust_code``: build classes a ``--ckpt_path`` recipe names outside focaldet's allow-list
    (`focaldet.config.safe_load`); set by ``focaldet --trust_checkpoint_code``."""

    trust_code = False

    def __init__(self, *args, **kwargs) -> None:
        self._command = _subcommand_of(kwargs.get("args") or [])
        # the optimiser and its schedule are the module's own arguments (model.optimizer,
        # model.lr_scheduler): no second, top-level `optimizer:` section
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_class", FocaldetArgumentParser)
        super().__init__(*args, **kwargs)

    def subcommands(self) -> dict[str, set[str]]:
        """Lightning's subcommands, only the one this command line runs when it names one: each
        subcommand's parser costs ~0.05 s to build, and a command parses as one subcommand."""
        every = LightningCLI.subcommands()
        return {self._command: every[self._command]} if self._command in every else every

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.label_map", "model.label_map", compute_fn=lambda m: m.to_dict(),
                              apply_on="instantiate")
        parser.link_arguments("data.inputs", "model.inputs", compute_fn=lambda s: s.to_dict(), apply_on="instantiate")
        parser.link_arguments("data.batch_size", "model.batch_size")
        # sliced inference cuts the original image: the data module must not resize it first
        # so does test-time augmentation (each view resizes the original image itself)
        parser.link_arguments(("model.slicing", "model.tta"), "data.eval_original_size",
                              compute_fn=lambda s, t: s is not None or t is not None)

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        # focaldet always hands over its argv explicitly (`run`): Lightning's warning about "args"
        # given beside sys.argv does not apply
        self.config = parser.parse_args(args)
        _restore_typed_nulls(self.config, args or [])

    def _parse_ckpt_path(self) -> None:
        # Lightning would parse the checkpoint's hyperparameters over the config here, so that
        # they override what the user typed. focaldet instead puts the checkpoint's config
        # FIRST on the command line (`_config_from_checkpoint`): the checkpoint is the default,
        # `-c` and `--model.*`/`--data.*` override it, and config.yaml records what ran.
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if ckpt_path and Path(ckpt_path).is_file():
            check_checkpoint(ckpt_path)
            _check_ckpt_recipe(ckpt_path, self.trust_code)  # Lightning parses its class paths next

    def before_instantiate_classes(self) -> None:
        # the same resolution of "config of this subcommand" as Lightning's SaveConfigCallback
        sub = self.subcommand
        self._resolved = self._parser(sub).dump(self.config.get(str(sub), self.config), skip_none=False)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as e:  # jsonargparse wraps what a constructor raised: say that in one line
            cause = _focaldet_cause(e)
            if cause is None:
                raise
            raise cause from None
        self.model.run_config = self._resolved  # stored in every checkpoint
        if self.config.get(str(self.subcommand), self.config).trainer.logger in (None, True):
            self.trainer.loggers = [default_logger(self.trainer.default_root_dir)]  # see focaldet.engine.loggers
        # Checkpoints go where Lightning puts them, into the run's own version folder
        # (<default_root_dir>/lightning_logs/version_N/checkpoints); `--ckpt_path last` finds the newest run's.
        install_checkpoint_io(self.trainer)  # atomic saves, one-line errors on unreadable files
        self.trainer.callbacks.append(StopAllRanks())  # one failing DDP rank ends them all
        sub = self.subcommand
        if sub is not None and "ckpt_path" in self.config_init[sub]:  # checked before the trainer runs
            kwargs = self.config_init[sub]
            kwargs["ckpt_path"] = resolve_last(kwargs["ckpt_path"], self.trainer, sub)
            _note_eval_size(kwargs["ckpt_path"], self.datamodule.inputs, sub)
            if "weights_only" in kwargs:  # Lightning's own load: weights only (FocaldetCheckpointIO is, too)
                kwargs["weights_only"] = True


def _subcommand_of(args: Sequence[str]) -> str | None:
    """The subcommand of a LightningCLI command line: its first argument that is neither an
    option nor the file of ``-c``/``--config`` (None when there is none)."""
    values_of = ("-c", "--config")
    for i, arg in enumerate(args):
        if not arg.startswith("-") and (i == 0 or args[i - 1] not in values_of):
            return arg
    return None


def _typed_nulls(args: Sequence[str]) -> list[list[str]]:
    """The dotted keys of ``--a.b.c null`` / ``--a.b.c=null`` in ``args``."""
    keys = [a[2:].split("=", 1)[0] for a in args if a.startswith("--") and a.endswith("=null")]
    keys += [a[2:] for a, v in zip(args, args[1:]) if a.startswith("--") and "=" not in a and v == "null"]
    return [k.split(".") for k in keys]


def _restore_typed_nulls(config, args: Sequence[str]) -> None:
    """jsonargparse 4.53 parses ``null`` typed for a ``str | None`` argument two class levels
    deep (``--model.model.backbone.weights null``) as the string ``"None"``: put back the None
    the user typed (a YAML ``null`` parses right)."""
    sub = config.get("subcommand")
    root = config[sub] if sub else config
    for parts in _typed_nulls(list(args)):
        node, *path, last = [root, *parts]
        for part in path:
            if isinstance(node, dict) or not hasattr(node, part):  # `init_args` is implied on the command line
                node = getattr(node, "init_args", None)
            node = getattr(node, part, None) if node is not None else None
            if node is None:
                break
        else:
            if not hasattr(node, last) and hasattr(node, "init_args"):
                node = node.init_args
            if getattr(node, last, None) == "None":
                setattr(node, last, None)


def _focaldet_cause(exc: BaseException) -> FocaldetError | None:
    """The `FocaldetError` an exception was raised from (jsonargparse re-raises a part's
    constructor error as a ValueError listing every Union subtype)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, FocaldetError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _check_ckpt_recipe(path: str, trust_code: bool) -> None:
    """A checkpoint whose recipe names a class focaldet does not build from a file is refused
    before LightningCLI parses (and imports) it."""
    from focaldet.api import check_recipe, read_checkpoint

    try:
        contents = read_checkpoint(path)
    except FocaldetError:
        return  # not a focaldet checkpoint: Lightning reads no recipe from it
    check_recipe(contents, trust_code)


def trainer_defaults() -> dict:
    return {
        "default_root_dir": "runs",
        "callbacks": [
            ModelCheckpoint(monitor="val/mAP", mode="max", save_last=True, filename="best-{step}-{val/mAP:.4f}",
                            auto_insert_metric_name=False),
            LearningRateMonitor(logging_interval="step"),
            PredictionWriter(),
            TrainingSpeed(),
        ],
    }


PARSER_KWARGS = {"allow_abbrev": False, "prog": "focaldet"}  # `--trainer.max_step 10` is an error, not max_steps

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def run_lightning(args: list[str]) -> int:
    """``focaldet fit|validate|test|predict ARGS`` (and ``-c C fit ...``)."""
    from focaldet.config.safe_load import import_policy

    args, trust = trusted(args)
    check_configs(_config_files(args), args, trust)
    if args and args[0] in CHECKPOINT_COMMANDS:
        args = _config_from_checkpoint(args, trust)
    with import_policy(trust):  # a class_path outside focaldet's allow-list is never imported
        cli_class(trust)(
            RetinaNetModule, CocoDataModule,
            trainer_defaults=trainer_defaults(),
            save_config_kwargs={"overwrite": True},
            parser_kwargs=PARSER_KWARGS,
            args=args,
        )
    return 0


TRUST_FLAG = "--trust_checkpoint_code"  # see docs/security.md


def trusted(args: Sequence[str]) -> tuple[list[str], bool]:
    """``(args without --trust_checkpoint_code, whether it was given)``: a command's (or a
    sweep's run's) arguments may say that its configs and checkpoints are trusted."""
    return [str(a) for a in args if a != TRUST_FLAG], TRUST_FLAG in args


def check_configs(configs: Sequence[str], args: Sequence[str], trust: bool) -> None:
    """The checks every run's configs and arguments pass before the parser imports anything,
    each a one-line `ConfigError` naming the file or flag: a ``class_path`` outside the
    allow-list (`focaldet.config.safe_load.check_config_file`), a flat model key of earlier
    versions (`focaldet.config.migrate.check_moved_keys`: its new home)."""
    from focaldet.config.migrate import check_moved_keys
    from focaldet.config.safe_load import check_config_file

    for config in configs:
        check_config_file(config, trust)
    check_moved_keys([str(c) for c in configs], list(args))


def cli_class(trust: bool) -> type[FocaldetCLI]:
    """`FocaldetCLI`, or its subclass that builds the classes a trusted checkpoint's recipe names."""
    return type("FocaldetCLI", (FocaldetCLI,), {"trust_code": True}) if trust else FocaldetCLI


def _config_files(args: list[str]) -> list[str]:
    """The files of ``-c X`` / ``--config X`` / ``--config=X``."""
    found = [a.split("=", 1)[1] for a in args if a.startswith(("--config=", "-c="))]
    found += [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-c", "--config")]
    return [f for f in found if Path(f).is_file()]


CHECKPOINT_COMMANDS = ("fit", "validate", "test", "predict")


def _config_from_checkpoint(args: list[str], trust_code: bool = False) -> list[str]:
    """A command given ``--ckpt_path FILE``: the checkpoint's config (`focaldet.api.checkpoint_config`:
    its recipe, label map and eval inputs) goes first on the command line, so it is the
    default and whatever the user typed after it (``-c``, ``--model.*``, ``--data.*``) wins
    and is recorded in the run's config.yaml. ``--ckpt_path last``/``best`` (not a file yet)
    leave the arguments as they are."""
    ckpt = next((a.split("=", 1)[1] for a in args if a.startswith("--ckpt_path=")), None)
    if ckpt is None and "--ckpt_path" in args[:-1]:
        ckpt = args[args.index("--ckpt_path") + 1]
    if ckpt is None or not Path(ckpt).is_file():
        return args
    check_checkpoint(ckpt)  # a bad file named in one line, before its config is read
    from focaldet.api import checkpoint_config

    return [args[0], "--config", checkpoint_config(ckpt, trust_code), *args[1:]]


def _note_eval_size(ckpt_path: str | None, inputs, command: str) -> None:
    """Say once when a run evaluates at other input settings than its checkpoint's."""
    if command == "fit" or not ckpt_path or not Path(ckpt_path).is_file():
        return
    from focaldet.api import read_checkpoint

    saved = read_checkpoint(ckpt_path).inputs
    if saved != inputs:
        from lightning.pytorch.utilities import rank_zero_only

        rank_zero_only(print)(f"focaldet: note: {command} runs at min_size {inputs.min_size}, max_size "
                              f"{inputs.max_size}, size_divisibility {inputs.size_divisibility}"
                              f"{', custom eval_transforms' if inputs.eval_transforms else ''}; the checkpoint "
                              f"{ckpt_path} evaluates at min_size {saved.min_size}, max_size {saved.max_size}, "
                              f"size_divisibility {saved.size_divisibility}"
                              f"{', custom eval_transforms' if saved.eval_transforms else ''} (your settings win)",
                              file=sys.stderr, flush=True)

