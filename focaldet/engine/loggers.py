"""focaldet's default logger: TensorBoard events and ``metrics.csv`` in ONE version folder.

``focaldet fit|validate|test`` log with :class:`TensorBoardCSVLogger` unless
``--trainer.logger`` names another (``CSVLogger``, ``WandbLogger``, ``MLFlowLogger``, ...,
or ``false``): ``<default_root_dir>/lightning_logs/version_N/`` then holds the
TensorBoard event file (losses, learning rate, COCO numbers, per-class AP, validation
images) and the plain ``metrics.csv`` that scripts and tests read, and is
``trainer.log_dir``, where validate writes its files. Without the ``tensorboard`` package
the default is Lightning's ``CSVLogger`` in the same place.
"""

from __future__ import annotations

import warnings
from argparse import Namespace
from typing import Any

from lightning.fabric.loggers.tensorboard import _TENSORBOARD_AVAILABLE
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only


class TensorBoardCSVLogger(TensorBoardLogger):
    """``TensorBoardLogger`` that also writes its metrics to ``metrics.csv`` in its own
    version folder (a ``CSVLogger`` pinned to the same save_dir, name and version)."""

    def __init__(self, save_dir: str = "runs", name: str = "lightning_logs", version: int | str | None = None,
                 **kwargs: Any):
        super().__init__(save_dir, name=name, version=version, **kwargs)
        self._csv: CSVLogger | None = None

    @property
    def csv(self) -> CSVLogger:
        """The CSV twin, created on first use with the version TensorBoard resolved."""
        if self._csv is None:
            self._csv = CSVLogger(self.save_dir, name=self.name, version=self.version)
            with warnings.catch_warnings():  # the folder already holds the event file: expected
                warnings.filterwarnings("ignore", message="Experiment logs directory")
                _ = self._csv.experiment
        return self._csv

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        super().log_metrics(dict(metrics), step)
        self.csv.log_metrics(dict(metrics), step)

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace, metrics: dict | None = None) -> None:
        super().log_hyperparams(params, metrics)  # hparams.yaml: TensorBoard's copy is enough

    @rank_zero_only
    def save(self) -> None:
        super().save()
        if self._csv is not None:
            self._csv.save()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        if self._csv is not None:
            self._csv.finalize(status)


def default_logger(root_dir: str) -> Logger:
    """The logger a run gets when ``--trainer.logger`` is not given: :class:`TensorBoardCSVLogger`
    under ``root_dir``, or ``CSVLogger`` when tensorboard is not installed."""
    if _TENSORBOARD_AVAILABLE:
        return TensorBoardCSVLogger(root_dir)
    return CSVLogger(root_dir)
