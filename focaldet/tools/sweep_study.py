"""The engine under ``focaldet sweep``: an Optuna study that any number of workers share.

Every ``focaldet sweep`` process started with the same ``--out`` / ``--storage`` (and the same
cells) opens one study in that storage and takes trials from it until every cell is done:

- grid mode (``--param KEY=V1,V2``): ``GridSampler`` over the cells; one trial per cell. Cells
  whose resolved ``fit`` configuration is the same (``1`` and ``1.0``) are one trial. The study
  is named after the cells' configurations (``grid-<hash>``), so an edited config file is a new
  study, while a cell whose configuration was finished in *any* study of the storage is reused.
- search mode (``--param KEY=log:1e-4:1e-2 --trials N``): ``TPESampler``, N trials in all
  (over all workers; a few more when workers ask at the same moment).
- a worker that dies (killed, node lost) stops its heartbeat; after the grace period another
  worker marks its trial failed and retries it (``RetryHeartbeatStaleTrialCallback``).
- ``--prune``: ``MedianPruner`` on the val mAP that each validation during ``fit`` reports.

A trial keeps its cell's name in ``params["cell"]`` (grid) and its result in
``user_attrs["result"]`` (``RunResult.to_dict()``), its error in ``user_attrs["error"]``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from focaldet.errors import ConfigError

__all__ = ["SearchRange", "open_storage", "parse_search_range", "PruneOnValMAP"]

RANGE_RE = re.compile(r"(log|float|int):([^:]+):([^:]+)")


@dataclass(frozen=True)
class SearchRange:
    """``log:1e-4:1e-2`` (float, log-uniform), ``float:0:1`` or ``int:1:8`` of ``--param``."""

    kind: str
    low: float
    high: float

    def distribution(self):
        from optuna.distributions import FloatDistribution, IntDistribution

        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high))
        return FloatDistribution(self.low, self.high, log=self.kind == "log")


def parse_search_range(text: str, param: str) -> SearchRange | None:
    """``"log:1e-4:1e-2"`` -> ``SearchRange("log", 1e-4, 1e-2)``; None when ``text`` is no range."""
    m = RANGE_RE.fullmatch(text.strip())
    if m is None:
        return None
    kind, low, high = m.groups()
    try:
        lo, hi = (int(low), int(high)) if kind == "int" else (float(low), float(high))
    except ValueError:
        raise ConfigError(f"--param {param!r}: {kind} range bounds must be numbers, got {low!r}, {high!r}") from None
    if not lo < hi or (kind == "log" and lo <= 0):
        raise ConfigError(f"--param {param!r}: need low < high{' and low > 0 for log' if kind == 'log' else ''}")
    return SearchRange(kind, lo, hi)


def default_storage(out: Path) -> str:
    return f"sqlite:///{out.resolve() / 'sweep.db'}"


def open_storage(url: str, heartbeat: int = 60):
    """An ``RDBStorage`` of ``url`` with worker heartbeats every ``heartbeat`` s: a trial without
    one for ``2 * heartbeat`` s is failed and retried (up to 3 times) by the next worker to look."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeat, retry
    engine_kwargs = {"connect_args": {"timeout": 300}} if url.startswith("sqlite") else {}
    for attempt in range(5):
        try:
            return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat,
                              grace_period=2 * heartbeat,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3))
        except (optuna.exceptions.OptunaError, ImportError, ValueError) as e:
            error = e
            break
        except Exception as e:  # noqa: BLE001 -- two workers creating the tables at once: the second retries
            error = e
            time.sleep(1 + attempt)
    raise ConfigError(f"--storage {url}: cannot open it ({type(error).__name__}: "
                      f"{' '.join(str(error).split())[:300]})") from None


@contextmanager
def quiet_optuna():
    """Optuna's per-trial log lines off (the sweep prints its own, one per cell)."""
    import optuna

    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def short_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def stored_result(storage, key: str, exclude: int | None = None) -> tuple[dict, str] | None:
    """A finished run of the configuration ``key`` in any study of ``storage``:
    ``(result, "study_name#trial")``, or None."""
    from optuna.trial import TrialState

    for study in storage.get_all_studies():
        for t in storage.get_all_trials(study._study_id, deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.user_attrs.get("config_key") == key and "result" in t.user_attrs and t._trial_id != exclude:
                return t.user_attrs["result"], f"{study.study_name}#{t.number}"
    return None


class PruneOnValMAP:
    """A Lightning callback: after each validation of ``fit``, report the val mAP to ``trial``
    (step = optimiser steps) and stop the run with ``optuna.TrialPruned`` if the pruner says so."""

    def __new__(cls, trial):
        import lightning as L
        import optuna

        class _Prune(L.Callback):
            def on_validation_end(self, trainer, module) -> None:
                ev = getattr(module, "last_eval", None)
                if trainer.sanity_checking or ev is None or not math.isfinite(ev.stats.get("mAP", math.nan)):
                    return
                trial.report(float(ev.stats["mAP"]), int(trainer.global_step))
                if trial.should_prune():
                    raise optuna.TrialPruned(f"val mAP {100 * ev.stats['mAP']:.1f} at step {trainer.global_step}")

        return _Prune()


def wait_poll(heartbeat: int, polls: int) -> float:
    """Seconds before a waiting worker looks at the study again, its ``polls``-th look:
    0.5, 1, 2, 4 ... s (another worker's cell may end any moment), at most the heartbeat
    and 30 s."""
    return min(0.5 * 2 ** min(polls, 6), max(0.5, min(heartbeat, 30)))


def sleep(seconds: float) -> None:
    time.sleep(seconds)


RunFn = Callable[..., dict]
