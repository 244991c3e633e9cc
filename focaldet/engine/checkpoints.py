"""Checkpoints that survive faults: atomic saves, corrupt files named, ``last`` recovered.

- :class:`FocaldetCheckpointIO` (installed by ``focaldet`` in place of Lightning's
  ``TorchCheckpointIO``) writes each checkpoint to a temporary file *in the same folder*,
  fsyncs it and renames it over the target, so a failed save (disk full, killed process)
  leaves the previous file intact; the failure stops the run with one line naming the path.
  (Lightning's ``_atomic_save`` stages the file under the system temp dir and then
  ``shutil.move``s it: across file systems that is a copy that truncates the old file first.)
  Reading a file that is not a checkpoint raises :class:`~focaldet.errors.CheckpointError`.
- Each run writes its checkpoints into its own folder, ``<default_root_dir>/lightning_logs/
  version_N/checkpoints`` (Lightning's place, beside the run's logs); ``--ckpt_path last``
  resumes the newest run's (:func:`resolve_last`), and says which folders it searched when
  there is none.
- :func:`resolve_ckpt_path` checks ``--ckpt_path`` before the trainer runs. For ``last``
  with an unreadable ``last.ckpt`` it falls back to the newest readable checkpoint in the
  folder, warning with both names, or refuses naming them all.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from focaldet.atomic import atomic_write, remove_stale_temporaries
from focaldet.errors import CheckpointError, WeightsError
from focaldet.modeling.weights import read_weights_file
from focaldet.config.safe_load import UnsafeFileError

# what Lightning's "last" matches (ModelCheckpoint.CHECKPOINT_NAME_LAST, with its "-vN" copies)
LAST_NAME = "last"
SUFFIX = ".ckpt"


class CheckpointWarning(UserWarning):
    """A checkpoint focaldet skipped (and what it used instead)."""


def _is_remote(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False,
                         weights_only: bool | None = True) -> dict:
    """A Lightning checkpoint, read by `focaldet.modeling.weights.read_weights_file`: always weights
    only (``weights_only`` is accepted for Lightning's signature and ignored), so a pickle that
    would run code is refused (``UnsafeFileError``); any unreadable file raises one
    ``CheckpointError`` naming it (zero bytes, truncated, random bytes, a damaged pickle, not
    a checkpoint dict)."""
    path = Path(path)
    try:  # the reader of focaldet.load and init_weights: the same file gets the same message
        ckpt = read_weights_file(path, "checkpoint", map_location=map_location, mmap=mmap)
    except UnsafeFileError:
        raise
    except WeightsError as e:  # missing, not a torch.save file, truncated, damaged
        raise CheckpointError(str(e)) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"checkpoint {path}: not a Lightning checkpoint (no 'state_dict')")
    return ckpt


def check_checkpoint(path: str | os.PathLike) -> None:
    """Raises ``CheckpointError`` unless ``path`` reads as a checkpoint (tensors are memory-mapped,
    not read, so this costs little beyond unpickling the metadata)."""
    load_checkpoint_file(path, mmap=True)


def _readable(path: Path) -> CheckpointError | None:
    try:
        check_checkpoint(path)
    except CheckpointError as e:
        return e
    return None


def resolve_ckpt_path(ckpt_path: str | None, ckpt_dir: str | os.PathLike) -> str | None:
    """The checkpoint a subcommand should load, checked: ``ckpt_path`` itself, or for ``"last"``
    the newest readable ``last*.ckpt`` in ``ckpt_dir``, else (warning) the newest readable
    ``*.ckpt`` there. ``None``, ``"best"``, ``"hpc"``, remote URLs and a ``last`` with no
    checkpoint at all in ``ckpt_dir`` are left for Lightning to resolve."""
    if ckpt_path is None or ckpt_path in ("best", "hpc", "registry") or _is_remote(ckpt_path) \
            or str(ckpt_path).startswith("registry:"):
        return ckpt_path
    if ckpt_path != LAST_NAME:
        check_checkpoint(ckpt_path)
        return ckpt_path
    folder = Path(ckpt_dir)
    found = sorted(folder.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime, reverse=True) if folder.is_dir() else []
    if not found:
        return ckpt_path  # Lightning warns "no last checkpoint" and starts afresh
    lasts = [p for p in found if p.stem == LAST_NAME or p.stem.startswith(LAST_NAME + "-")]
    bad: list[Path] = []
    for path in lasts + [p for p in found if p not in lasts]:  # the lasts first, then the newest other
        if _readable(path) is None:
            if bad:
                warnings.warn(f"--ckpt_path last: {bad[0]} is truncated or corrupt; resuming from {path}, "
                              f"the newest readable checkpoint in {folder}", CheckpointWarning, stacklevel=2)
            elif path not in lasts:  # killed before its first last.ckpt was complete
                warnings.warn(f"--ckpt_path last: no {LAST_NAME}{SUFFIX} in {folder}; resuming from {path}, "
                              f"the newest checkpoint there", CheckpointWarning, stacklevel=2)
            return str(path)
        bad.append(path)
    raise CheckpointError(f"--ckpt_path last: no readable checkpoint in {folder} (truncated or corrupt: "
                          f"{', '.join(p.name for p in bad)}); delete them to start afresh")


class FocaldetCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with an atomic local save and one-line errors on save and load."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if _is_remote(path) or storage_options is not None:
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        try:
            remove_stale_temporaries(target)  # left by a process killed mid-save
            with atomic_write(target, "wb", fsync=True) as f:  # readers see the old file or the new one
                torch.save(checkpoint, f)
        except OSError as e:
            raise CheckpointError(f"could not save checkpoint {target}: {e.strerror or e} "
                                  f"(the previous file, if any, is unchanged)") from e

    def load_checkpoint(self, path, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if _is_remote(path):  # weights only there too, whatever the caller asked
            return super().load_checkpoint(path, map_location, weights_only=True)
        return load_checkpoint_file(path, map_location=map_location)


RUN_CHECKPOINTS = "lightning_logs/version_*/checkpoints"  # each run's own folder, under default_root_dir


def run_checkpoint_dirs(root: str | os.PathLike) -> list[Path]:
    """The checkpoint folders of the runs under ``root`` that hold a checkpoint, the one with the
    most recently written checkpoint first: ``<root>/lightning_logs/version_N/checkpoints``
    (where each ``focaldet`` run writes its own), and ``<root>/checkpoints`` (runs without a
    logger, and runs of older focaldet versions)."""
    root = Path(root)
    newest: dict[Path, float] = {}
    for folder in [*root.glob(RUN_CHECKPOINTS), root / "checkpoints"]:
        times = [p.stat().st_mtime for p in folder.glob(f"*{SUFFIX}")] if folder.is_dir() else []
        if times:
            newest[folder] = max(times)
    return sorted(newest, key=newest.get, reverse=True)


def checkpoint_dir(trainer) -> Path:
    """Where ``--ckpt_path last`` looks: the checkpoint callback's folder when the config names
    one, else the checkpoint folder of the newest run under ``default_root_dir`` (see
    `run_checkpoint_dirs`; a new run writes to its own version folder, so resuming reads the
    previous run's), else ``<default_root_dir>/lightning_logs`` (where nothing is)."""
    callback = trainer.checkpoint_callback
    if callback is not None and callback.dirpath:
        return Path(callback.dirpath)
    found = run_checkpoint_dirs(trainer.default_root_dir)
    return found[0] if found else Path(trainer.default_root_dir) / "lightning_logs"


def resolve_last(ckpt_path: str | None, trainer, subcommand: str) -> str | None:
    """`resolve_ckpt_path` for a subcommand: ``last`` is the newest run's last checkpoint
    (`checkpoint_dir`). When there is none, ``fit`` warns naming the folder it searched and
    starts afresh; ``validate``, ``test`` and ``predict`` raise `CheckpointError` naming it."""
    folder = checkpoint_dir(trainer)
    if ckpt_path == LAST_NAME and not (folder.is_dir() and any(folder.glob(f"*{SUFFIX}"))):
        callback = trainer.checkpoint_callback
        searched = folder if callback is not None and callback.dirpath else \
            f"{Path(trainer.default_root_dir) / RUN_CHECKPOINTS} and {Path(trainer.default_root_dir) / 'checkpoints'}"
        if subcommand != "fit":
            raise CheckpointError(f"--ckpt_path last: no checkpoint found in {searched} "
                                  f"(trainer.default_root_dir {trainer.default_root_dir})")
        warnings.warn(f"--ckpt_path last: no checkpoint found in {searched}; training starts afresh",
                      CheckpointWarning, stacklevel=2)
        return None
    return resolve_ckpt_path(ckpt_path, folder)


def install_checkpoint_io(trainer) -> None:
    """Puts :class:`FocaldetCheckpointIO` in place of the trainer's default ``TorchCheckpointIO``
    (a user's own ``trainer.plugins`` checkpoint IO is left alone)."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = FocaldetCheckpointIO()
