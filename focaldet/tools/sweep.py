"""``focaldet sweep``: one training run per cell of a parameter grid, evaluated on the val split,
tabulated as the focal loss paper's Table 1.

::

    focaldet sweep -c configs/study_synth.yaml -c configs/losses/sigmoid_focal.yaml \\
        --param model.criterion.cls_loss.gamma=0,0.5,1,2,5 \\
        --param model.criterion.cls_loss.alpha=0.25,0.5,0.75 --out runs/sweep [fit arguments]

Keys are ``focaldet fit``'s dotted keys; values are YAML scalars (numbers, strings, ``null``),
comma-separated (commas inside ``[...]`` or ``{...}`` do not split). The key ``config`` adds a
config file per cell (``--param config=configs/losses/bce.yaml,configs/losses/varifocal.yaml``).
Other arguments go to every run as to ``fit``. The cells run one after the other; each run is
``focaldet fit`` (``focaldet.engine.runs``) followed by one validation of the final weights. Written::

    DIR/cells/<cell>/run/          the run's folder (checkpoints, logs, validation files)
    DIR/cells/<cell>/result.json   written (atomically) once the cell has finished
    DIR/results.csv                one row per cell: parameters, status, 12 COCO numbers,
                                   per-class AP and AP50, steps, train and wall seconds
    DIR/table.md                   AP, AP50, AP75 per cell (Table 1a); with two parameters also
                                   the best second value per first value (Table 1b) and the AP grid
    DIR/heatmap.png                two parameters: AP (%) per cell, annotated

Re-running the command skips the cells whose ``result.json`` exists and was made with the same
arguments, so a killed sweep resumes. A failing cell (a bad value, a diverged run, any error) is
reported on one line and as a ``failed`` row; the sweep goes on, and exits with status 1.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from focaldet.atomic import atomic_write
from focaldet.errors import ConfigError
from focaldet.failures import one_line

__all__ = ["Cell", "CellOutcome", "expand_grid", "parse_param", "parse_value", "run_sweep",
           "split_values", "table_markdown", "write_heatmap", "write_outputs"]

CONFIG_KEY = "config"  # --param config=A.yaml,B.yaml: an extra config file per cell
TABLE_STATS = ("mAP", "AP50", "AP75")  # the paper's Table 1 columns
TABLE_HEADERS = ("AP", "AP50", "AP75")
RESULT_FILE = "result.json"

Scalar = int | float | str | bool | None


# ---------------------------------------------------------------------------------- the grid
def split_values(text: str) -> list[str]:
    """``"0,0.5,[1,2]"`` -> ``["0", "0.5", "[1,2]"]``: commas inside brackets or braces do not split."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts]


def parse_value(text: str) -> Any:
    """One value as YAML reads it: ``0.5`` -> 0.5, ``1e-3`` -> 0.001, ``null`` -> None, ``abc`` -> "abc"."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"sweep value {text!r} is not valid YAML: {' '.join(str(e).split())}") from None
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)", value):
        value = float(value)  # YAML 1.1 reads 1e-3 as a string; any reader means the number
    return value


def parse_param(text: str) -> tuple[str, Any]:
    """``"KEY=V1,V2"`` -> ``(KEY, [v1, v2])``, ``"KEY=log:1e-4:1e-2"`` -> ``(KEY, SearchRange(...))``
    (also ``float:LOW:HIGH``, ``int:LOW:HIGH``); raises ``ConfigError`` naming the bad part."""
    from focaldet.tools.sweep_study import parse_search_range

    key, sep, values = text.partition("=")
    key = key.strip().removeprefix("--")
    if not sep or not key or not values.strip():
        raise ConfigError(f"--param {text!r}: expected KEY=V1,V2,... (e.g. model.criterion.cls_loss.gamma=0,2)")
    if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
        raise ConfigError(f"--param {text!r}: {key!r} is not a dotted key like model.criterion.cls_loss.gamma")
    from focaldet.config.migrate import moved_key

    moved = next(filter(None, (moved_key(key, v) for v in split_values(values))), None)
    if moved:  # a flat key of the module's earlier layout (model.optimizer only with sgd / adamw)
        raise ConfigError(f"--param {text!r}: {moved}")
    search_range = parse_search_range(values, text)
    if search_range is not None:
        if key == CONFIG_KEY:
            raise ConfigError(f"--param {text!r}: config files are a list, not a range")
        return key, search_range
    parsed = [parse_value(v) for v in split_values(values)]
    if any(v == "" for v in split_values(values)):
        raise ConfigError(f"--param {text!r}: an empty value (two commas in a row, or a trailing comma)")
    if len({json.dumps(v, sort_keys=True) for v in parsed}) != len(parsed):
        raise ConfigError(f"--param {text!r}: a value is repeated")
    return key, parsed


def cli_value(value: Any) -> str:
    """A parsed value as the CLI reads it back (``None`` -> ``null``, lists as JSON)."""
    if isinstance(value, str):
        return value
    return json.dumps(value)  # numbers, true/false, null, lists, mappings


def _labels(key: str, values: Sequence[Any]) -> list[str]:
    """Short labels of one parameter's values: paths by their file stem when that is unambiguous."""
    texts = [cli_value(v) for v in values]
    if all(isinstance(v, str) and ("/" in v or "." in Path(v).suffix) for v in values):
        stems = [Path(v).stem for v in values]
        if len(set(stems)) == len(stems):
            return stems
    return texts


def _short_keys(keys: Sequence[str]) -> list[str]:
    """``model.criterion.cls_loss.gamma`` -> ``gamma`` (the full key where the last parts collide)."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return [s if last.count(s) == 1 else k for s, k in zip(last, keys)]


@dataclass(frozen=True)
class Cell:
    """One run of the grid: ``values`` (key -> value), its ``name`` (a folder name) and the
    ``configs`` and ``args`` it adds to the sweep's own."""

    index: int
    values: dict[str, Any]
    labels: dict[str, str]
    name: str
    configs: tuple[str, ...] = ()
    args: tuple[str, ...] = ()


def expand_grid(params: Sequence[tuple[str, Sequence[Any]]]) -> list[Cell]:
    """Every combination of the parameters' values, the first parameter varying slowest
    (the order the values were given in)."""
    keys = [k for k, _ in params]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"sweep: a key is given twice in --param ({', '.join(keys)})")
    short = _short_keys(keys)
    labels = [_labels(k, vs) for k, vs in params]
    cells: list[Cell] = [Cell(0, {}, {}, "")]
    for key, name, (_, values), texts in zip(keys, short, params, labels):
        grown = []
        for cell in cells:
            for value, text in zip(values, texts):
                extra_cfg, extra_args = ((cli_value(value),), ()) if key == CONFIG_KEY else \
                    ((), (f"--{key}", cli_value(value)))
                grown.append(Cell(0, {**cell.values, key: value}, {**cell.labels, key: text},
                                  ",".join(filter(None, [cell.name, f"{name}={text}"])),
                                  cell.configs + extra_cfg, cell.args + extra_args))
        cells = grown
    out = []
    for i, c in enumerate(cells):
        name = re.sub(r"[^\w.=,+-]", "_", c.name) or "run"
        out.append(Cell(i, c.values, c.labels, name, c.configs, c.args))
    if len({c.name for c in out}) != len(out):
        raise ConfigError("sweep: two cells get the same folder name; give values that differ in their labels")
    return out


# ---------------------------------------------------------------------------------- running
@dataclass
class CellOutcome:
    """What became of one cell: ``result`` (``RunResult.to_dict()``) or ``error`` (one line)."""

    cell: Cell
    status: str  # "ok" | "failed" | "pruned" | "pending"
    result: dict | None = None
    error: str | None = None
    skipped: bool = field(default=False)  # finished earlier, by another worker, or the same config as another cell


def _write_json_atomic(path: Path, data: dict) -> None:
    with atomic_write(path) as f:  # a reader sees the old file or the complete new one, never half of one
        f.write(json.dumps(data, indent=2))


def config_key(configs: Sequence[str], args: Sequence[str]) -> str:
    """A cell's identity: the hash of the configuration ``fit`` resolves from its configs and
    arguments (``focaldet.engine.runs.resolve_run_config``), so ``1`` and ``1.0`` of a float are one cell
    and an edited config file is a new one. A bad argument raises ``ConfigError``."""
    from focaldet.engine.runs import resolve_run_config

    return hashlib.sha256(resolve_run_config(configs, args).encode()).hexdigest()[:16]


def _default_run(configs: Sequence[str], args: Sequence[str], root_dir: Path, callbacks: Sequence = ()) -> dict:
    from focaldet.engine.runs import build_run, fit_and_evaluate

    cli = build_run(configs, args, root_dir)
    cli.trainer.callbacks.extend(callbacks)
    return fit_and_evaluate(cli).to_dict()


def _cell_of_trial(t, names: Sequence[str]) -> str | None:
    """The grid cell a trial runs: its ``cell`` param, its fixed (retried) one, or its grid id."""
    if "cell" in t.params:
        return t.params["cell"]
    fixed = t.system_attrs.get("fixed_params") or {}
    if "cell" in fixed:
        return fixed["cell"]
    grid_id = t.system_attrs.get("grid_id")
    return names[grid_id] if isinstance(grid_id, int) and 0 <= grid_id < len(names) else None


def _outcome_of(cell: Cell, trials: Sequence, started_before: int, grace: int) -> CellOutcome:
    """A cell's outcome from its (non-duplicate) trials, oldest first."""
    from optuna.trial import TrialState

    done = [t for t in trials if t.state == TrialState.COMPLETE and "result" in t.user_attrs]
    if done:
        t = done[0]
        return CellOutcome(cell, "ok", t.user_attrs["result"],
                           skipped=t.number < started_before or t.user_attrs.get("worker") != _worker()
                           or "reused_from" in t.user_attrs)
    if not trials or any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials):
        return CellOutcome(cell, "pending")
    last = trials[-1]
    if last.state == TrialState.PRUNED:
        return CellOutcome(cell, "pruned", error=last.user_attrs.get("pruned", "pruned"))
    return CellOutcome(cell, "failed", error=last.user_attrs.get(
        "error", f"its worker {last.user_attrs.get('worker', '?')} stopped (no heartbeat for {2 * grace} s)"))


def _worker() -> str:
    from focaldet.tools.sweep_study import worker_name

    return worker_name()


def run_sweep(configs: Sequence[str], params: Sequence[tuple[str, Any]], out: str | Path,
              fit_args: Sequence[str] = (), run: Callable[..., dict] | None = None,
              log: Callable[[str], None] = print, *, storage: str | None = None, study_name: str | None = None,
              trials: int | None = None, prune: bool = False, heartbeat: int = 60, sampler_seed: int | None = None,
              resolve: Callable[[Sequence[str], Sequence[str]], str] | None = None) -> list[CellOutcome]:
    """Take cells from the sweep's Optuna study until every one has finished (here or in another
    worker sharing ``storage``), writing the outputs after each; returns the outcomes.

    ``params``: ``(key, [values])`` (a grid) or ``(key, SearchRange)`` (search mode, with
    ``trials``). ``run(configs, args, root_dir[, callbacks=]) -> RunResult.to_dict()`` trains and
    evaluates one cell (default: ``focaldet fit`` + validate); ``resolve(configs, args)`` names a
    cell's configuration (default: the hash of ``fit``'s resolved config). Tests pass stand-ins.
    """
    try:
        import optuna
    except ImportError:
        raise ConfigError("focaldet sweep runs on Optuna, which is not installed: pip install 'focaldet[sweep]'") \
            from None
    from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials
    from optuna.trial import TrialState

    from focaldet.tools.sweep_study import (
        PruneOnValMAP, SearchRange, default_storage, open_storage, quiet_optuna, short_hash, stored_result,
        wait_poll, worker_name,
    )

    run = run or _default_run
    resolve = resolve or config_key
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    keys = [k for k, _ in params]
    search = any(isinstance(v, SearchRange) for _, v in params)
    store = open_storage(storage or default_storage(out), heartbeat)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2) if prune else optuna.pruners.NopPruner()
    me = worker_name()

    if search:
        if not trials or trials < 1:
            raise ConfigError("sweep: a search (--param KEY=log:LOW:HIGH) needs --trials N")
        base = resolve(configs, fit_args)
        spec = {k: (v.__dict__ if isinstance(v, SearchRange) else [cli_value(x) for x in v]) for k, v in params}
        name = study_name or f"search-{short_hash([base, spec])}"
        sampler = optuna.samplers.TPESampler(seed=sampler_seed)
        cells: list[Cell] = []
        bad: dict[str, str] = {}
        cell_key: dict[str, str] = {}
        first_of: dict[str, str] = {}
        names: list[str] = []
    else:
        cells = expand_grid(params)
        bad, cell_key = {}, {}
        for cell in cells:
            try:
                cell_key[cell.name] = resolve([*configs, *cell.configs], [*fit_args, *cell.args])
            except ConfigError as e:  # a bad value: the cell fails without a trial
                bad[cell.name] = f"ConfigError: {one_line(e)}"
        first_of: dict[str, str] = {}
        for cell in cells:
            if cell.name in cell_key:
                first_of.setdefault(cell_key[cell.name], cell.name)
        names = list(first_of.values())  # one grid point per distinct configuration
        name = study_name or f"grid-{short_hash([[n, cell_key[n]] for n in names])}"
        sampler = optuna.samplers.GridSampler({"cell": names or ["-"]}, seed=sampler_seed)
        if sampler_seed is None:  # cells in the order given (GridSampler shuffles; trial i takes grid point i)
            sampler._all_grids.sort(key=lambda grid: names.index(grid[0]) if grid[0] in names else -1)
    by_name = {c.name: c for c in cells}
    n = len(cells)

    with quiet_optuna():
        study = optuna.create_study(storage=store, study_name=name, sampler=sampler, pruner=pruner,
                                    direction="maximize", load_if_exists=True)
    started_before = len(study.get_trials(deepcopy=False))
    log(f"sweep: study {name} in {storage or default_storage(out)} ({started_before} trials so far), worker {me}")

    def mine(t) -> bool:
        return "duplicate_of" not in t.user_attrs

    def trials_of(cell_name: str) -> list:
        return [t for t in study.get_trials(deepcopy=False) if mine(t) and _cell_of_trial(t, names) == cell_name]

    def run_cell(trial, cell: Cell, key: str, label: str) -> float:
        trial.set_user_attr("config_key", key)
        trial.set_user_attr("worker", me)
        cell_dir = out / "cells" / cell.name
        record = {"cell": cell.name, "values": cell.values, "configs": [*configs, *cell.configs],
                  "args": [*fit_args, *cell.args], "config_key": key, "study": name, "trial": trial.number}
        reused = stored_result(store, key, exclude=trial._trial_id)
        if reused is not None:
            result, source = reused
            trial.set_user_attr("result", result)
            trial.set_user_attr("reused_from", source)
            log(f"sweep: {label} {cell.name}: the same configuration ran in {source}, reused "
                f"(AP {100 * result['stats']['mAP']:.1f})")
            return result["stats"]["mAP"]
        log(f"sweep: {label} {cell.name}: running")
        extra = {"callbacks": [PruneOnValMAP(trial)]} if prune else {}
        try:
            result = run(record["configs"], record["args"], cell_dir / "run", **extra)
        except optuna.TrialPruned as e:
            trial.set_user_attr("pruned", f"pruned: {e}")
            log(f"sweep: {label} {cell.name}: pruned ({e})")
            raise
        except Exception as exc:  # noqa: BLE001 -- any failure of one cell; Ctrl-C still stops the sweep
            error = f"{type(exc).__name__}: {one_line(exc)}"
            trial.set_user_attr("error", error)
            log(f"sweep: {label} {cell.name}: FAILED: {error}")
            _write_json_atomic(cell_dir / "failed.json", {**record, "error": error})
            raise
        trial.set_user_attr("result", result)
        _write_json_atomic(cell_dir / RESULT_FILE, {**record, "result": result})
        (cell_dir / "failed.json").unlink(missing_ok=True)
        log(f"sweep: {label} {cell.name}: AP {100 * result['stats']['mAP']:.1f} "
            f"in {result['steps']} steps, {result['wall_s']:.0f} s")
        return result["stats"]["mAP"]

    def grid_objective(trial) -> float:
        cell_name = trial.suggest_categorical("cell", names)
        for t in study.get_trials(deepcopy=False):  # another worker has (or had) this cell: leave it
            if (t.number != trial.number and mine(t) and _cell_of_trial(t, names) == cell_name
                    and (t.state == TrialState.COMPLETE
                         or (t.state == TrialState.RUNNING and t.number < trial.number))):
                trial.set_user_attr("duplicate_of", t.number)
                raise optuna.TrialPruned(f"cell {cell_name} is trial {t.number}")
        cell = by_name[cell_name]
        return run_cell(trial, cell, cell_key[cell_name], f"cell {cell.index + 1}/{n}")

    def search_objective(trial) -> float:
        values = {}
        for k, v in params:
            if isinstance(v, SearchRange) and v.kind == "int":
                values[k] = trial.suggest_int(k, int(v.low), int(v.high))
            elif isinstance(v, SearchRange):
                values[k] = trial.suggest_float(k, v.low, v.high, log=v.kind == "log")
            else:
                texts = [cli_value(x) for x in v]
                values[k] = v[texts.index(trial.suggest_categorical(k, texts))]
        cell = _search_cell(trial.number, values)
        try:
            key = resolve([*configs, *cell.configs], [*fit_args, *cell.args])
        except ConfigError as e:
            trial.set_user_attr("error", f"ConfigError: {one_line(e)}")
            log(f"sweep: trial {trial.number + 1}/{trials} {cell.name}: FAILED: ConfigError: {one_line(e)}")
            raise
        return run_cell(trial, cell, key, f"trial {trial.number + 1}/{trials}")

    def outcomes_now() -> list[CellOutcome]:
        if search:
            got = []
            for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
                if not mine(t) or not all(k in t.params for k in keys):
                    continue
                values = {k: (t.params[k] if isinstance(v, SearchRange)
                              else v[[cli_value(x) for x in v].index(t.params[k])]) for k, v in params}
                got.append(_outcome_of(_search_cell(t.number, values), [t], started_before, heartbeat))
            return got
        got = []
        for cell in cells:
            if cell.name in bad:
                got.append(CellOutcome(cell, "failed", error=bad[cell.name]))
                continue
            o = _outcome_of(cell, trials_of(first_of[cell_key[cell.name]]), started_before, heartbeat)
            o.skipped = o.skipped or first_of[cell_key[cell.name]] != cell.name
            got.append(o)
        return got

    for cell in cells:
        if cell.name in bad:
            log(f"sweep: cell {cell.index + 1}/{n} {cell.name}: FAILED: {bad[cell.name]}")
        elif first_of[cell_key[cell.name]] != cell.name:
            log(f"sweep: cell {cell.index + 1}/{n} {cell.name}: the same configuration as cell "
                f"{first_of[cell_key[cell.name]]}, not run again")
    if not search:  # cells that failed in an earlier invocation: retried once per invocation
        retry = RetryHeartbeatStaleTrialCallback(max_retry=None)
        for cell_name in names:
            ts = trials_of(cell_name)
            done = [t for t in ts if t.state == TrialState.COMPLETE and "result" in t.user_attrs]
            if done:
                log(f"sweep: cell {by_name[cell_name].index + 1}/{n} {cell_name}: finished earlier, skipped "
                    f"(AP {100 * done[0].user_attrs['result']['stats']['mAP']:.1f})")
                continue
            if ts and all(t.state in (TrialState.FAIL, TrialState.PRUNED) for t in ts):
                retry(study, ts[-1])
                log(f"sweep: cell {cell_name}: failed earlier, queued again")

    objective = search_objective if search else grid_objective
    polls = 0  # looks at the study while waiting for other workers' cells
    with quiet_optuna():
        while True:
            fail_stale_trials(study)
            all_trials = study.get_trials(deepcopy=False)
            live = [t for t in all_trials if mine(t)]
            waiting = any(t.state == TrialState.WAITING for t in live)
            if search:
                todo = len(live) < trials
            else:
                started = {_cell_of_trial(t, names) for t in live}
                todo = any(c not in started for c in names)
            if todo or waiting:
                study.optimize(objective, n_trials=1, catch=(Exception,))
                polls = 0
                write_outputs(out, keys, outcomes_now(), heatmap=False, grid=not search)  # the heatmap once, at the end
                continue
            running = [t for t in live if t.state == TrialState.RUNNING]
            if running:
                if not polls:
                    log(f"sweep: waiting for {len(running)} cell(s) that other workers are running "
                        f"(trials {', '.join(str(t.number) for t in running)})")
                time.sleep(wait_poll(heartbeat, polls))
                polls += 1
                continue
            break
    outcomes = outcomes_now()
    write_outputs(out, keys, outcomes, heatmap=not search)
    return outcomes


def _search_cell(number: int, values: dict[str, Any]) -> Cell:
    """The cell of search trial ``number``: its sampled values as ``fit`` arguments."""
    labels = {k: (f"{v:.4g}" if isinstance(v, float) else cli_value(v)) for k, v in values.items()}
    configs = tuple(cli_value(v) for k, v in values.items() if k == CONFIG_KEY)
    args = tuple(a for k, v in values.items() if k != CONFIG_KEY for a in (f"--{k}", cli_value(v)))
    return Cell(number, dict(values), labels, f"trial-{number:04d}", configs, args)


# ---------------------------------------------------------------------------------- outputs
def results_rows(keys: Sequence[str], outcomes: Sequence[CellOutcome]) -> tuple[list[str], list[dict]]:
    """The columns and rows of ``results.csv``."""
    from focaldet.evaluation.coco import STAT_NAMES

    classes: list[str] = []
    for o in outcomes:
        for name in (o.result or {}).get("per_class", {}):
            if name not in classes:
                classes.append(name)
    columns = ["cell", *keys, "status", *STAT_NAMES, *(f"AP/{c}" for c in classes),
               *(f"AP50/{c}" for c in classes), "steps", "train_s", "wall_s", "error"]
    rows = []
    for o in outcomes:
        row = {"cell": o.cell.name, **{k: cli_value(o.cell.values[k]) for k in keys}, "status": o.status, "error": o.error or ""}
        if o.result:
            r = o.result
            row.update({s: r["stats"].get(s) for s in STAT_NAMES})
            row.update({f"AP/{c}": r["per_class"].get(c) for c in classes})
            row.update({f"AP50/{c}": r["per_class_ap50"].get(c) for c in classes})
            row.update(steps=r["steps"], train_s=round(r["train_s"], 1), wall_s=round(r["wall_s"], 1))
        rows.append(row)
    return columns, rows


def _pct(result: dict | None, stat: str) -> str:
    if result is None:
        return "-"
    v = result["stats"][stat]
    return "n/a" if v is None or v < 0 or math.isnan(v) else f"{100 * v:.1f}"


def _status_cell(o: CellOutcome | None) -> str:
    return o.status if o is not None and o.status in ("failed", "pruned") else "-"


def table_markdown(keys: Sequence[str], outcomes: Sequence[CellOutcome], grid: bool = True) -> str:
    """``table.md``: AP / AP50 / AP75 (in %) per cell as Table 1a; with two parameters also
    Table 1b (for each value of the first, the value of the second with the best AP) and the
    AP grid (rows: first parameter, columns: second)."""
    short = _short_keys(keys)
    lines = ["# Sweep", "", "AP, AP50, AP75 in % (COCOeval on the val split, final weights).", "",
             "| " + " | ".join([*short, *TABLE_HEADERS]) + " |", "|" + "---|" * len(short) + "---:|" * 3]
    for o in outcomes:
        stats = [_pct(o.result, s) for s in TABLE_STATS] if o.result else [_status_cell(o)] * 3
        lines.append("| " + " | ".join([*(o.cell.labels[k] for k in keys), *stats]) + " |")
    if len(keys) == 2 and grid:
        first, second = keys
        rows = list(dict.fromkeys(o.cell.labels[first] for o in outcomes))
        cols = list(dict.fromkeys(o.cell.labels[second] for o in outcomes))
        by = {(o.cell.labels[first], o.cell.labels[second]): o for o in outcomes}
        lines += ["", f"Best {short[1]} for each {short[0]} (the layout of the paper's Table 1b):", "",
                  f"| {short[0]} | {short[1]} | " + " | ".join(TABLE_HEADERS) + " |", "|---|---|---:|---:|---:|"]
        for r in rows:
            done = [by[(r, c)] for c in cols if (r, c) in by and by[(r, c)].result]
            if not done:
                lines.append(f"| {r} | - | - | - | - |")
                continue
            best = max(done, key=lambda o: o.result["stats"]["mAP"])
            lines.append(f"| {r} | {best.cell.labels[second]} | "
                         + " | ".join(_pct(best.result, s) for s in TABLE_STATS) + " |")
        lines += ["", f"AP (%) by {short[0]} (rows) and {short[1]} (columns):", "",
                  f"| {short[0]} \\ {short[1]} | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        for r in rows:
            cells = [_pct(by[(r, c)].result, "mAP") if (r, c) in by and by[(r, c)].result
                     else _status_cell(by.get((r, c))) for c in cols]
            lines.append(f"| {r} | " + " | ".join(cells) + " |")
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        lines += ["", "Failed cells:", ""] + [f"- {o.cell.name}: {o.error}" for o in failed]
    return "\n".join(lines) + "\n"


def write_heatmap(keys: Sequence[str], outcomes: Sequence[CellOutcome], path: Path) -> Path:
    """AP (%) of a two-parameter grid as an annotated heatmap (failed cells marked, pending blank)."""
    import numpy as np
    from matplotlib.figure import Figure

    first, second = keys
    rows = list(dict.fromkeys(o.cell.labels[first] for o in outcomes))
    cols = list(dict.fromkeys(o.cell.labels[second] for o in outcomes))
    grid = np.full((len(rows), len(cols)), np.nan)  # (rows: first parameter, columns: second)
    text = [["" for _ in cols] for _ in rows]
    for o in outcomes:
        i, j = rows.index(o.cell.labels[first]), cols.index(o.cell.labels[second])
        if o.result:
            grid[i, j] = 100 * o.result["stats"]["mAP"]
            text[i][j] = f"{grid[i, j]:.1f}"
        elif o.status == "failed":
            text[i][j] = "failed"
    short = _short_keys(keys)
    widest = max(len(c) for c in cols)
    fig = Figure(figsize=(2.0 + max(1.1, 0.08 * widest) * len(cols), 1.5 + 0.6 * len(rows)), dpi=120)
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto")
    ax.grid(False)  # a style's axes grid would run through the numbers
    finite = grid[np.isfinite(grid)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(len(rows)):
        for j in range(len(cols)):
            dark = np.isfinite(grid[i, j]) and grid[i, j] < middle
            ax.text(j, i, text[i][j], ha="center", va="center", color="white" if dark else "black", fontsize=9)
    ax.set_xticks(range(len(cols)), cols, rotation=30 if widest > 8 else 0, ha="right" if widest > 8 else "center")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(short[1])
    ax.set_ylabel(short[0])
    ax.set_title("AP (%) on the val split")
    fig.colorbar(image, ax=ax, label="AP (%)")
    fig.tight_layout()
    fig.savefig(path)
    return path


def write_outputs(out: Path, keys: Sequence[str], outcomes: Sequence[CellOutcome], heatmap: bool = True,
                  grid: bool | None = None) -> list[Path]:
    """``results.csv``, ``table.md`` and (a grid of two parameters, ``heatmap``) ``heatmap.png`` in ``out``."""
    grid = heatmap if grid is None else grid
    out.mkdir(parents=True, exist_ok=True)
    columns, rows = results_rows(keys, outcomes)
    with atomic_write(out / "results.csv", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    (out / "table.md").write_text(table_markdown(keys, outcomes, grid=grid))
    written = [out / "results.csv", out / "table.md"]
    if len(keys) == 2 and heatmap and outcomes:
        written.append(write_heatmap(keys, outcomes, out / "heatmap.png"))
    return written


# ---------------------------------------------------------------------------------- command
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, prog="focaldet sweep", description="Train and evaluate one run per cell of a parameter grid.",
        epilog="Other arguments (--trainer.*, --model.*, --data.*, --trust_checkpoint_code) go to every run, as to "
               "`focaldet fit`.")
    parser.add_argument("-c", "--config", action="append", required=True,
                        help="training config; repeat to layer configs as `fit -c A -c B` does")
    parser.add_argument("--param", action="append", required=True, metavar="KEY=V1,V2,...",
                        help="a dotted key of `fit` and its values (YAML scalars); repeat for a grid; "
                             "the key `config` adds a config file per cell")
    parser.add_argument("--out", required=True, type=Path, help="output folder (re-run to resume)")
    study = parser.add_argument_group("the Optuna study (shared by every worker with the same --storage and cells)")
    study.add_argument("--storage", default=None, metavar="URL",
                       help="Optuna storage URL (default sqlite:///OUT/sweep.db; e.g. postgresql://host/db "
                            "for workers on many machines)")
    study.add_argument("--study_name", default=None, help="default: grid-<hash of the cells' configurations> "
                                                          "or search-<hash>")
    study.add_argument("--trials", type=int, default=None,
                       help="search mode (a --param KEY=log:LOW:HIGH, float:LOW:HIGH or int:LOW:HIGH): "
                            "trials in all, over all workers (TPE sampler)")
    study.add_argument("--prune", action="store_true",
                       help="stop runs whose val mAP at a validation during fit is below the median (MedianPruner)")
    study.add_argument("--heartbeat", type=int, default=60, metavar="S",
                       help="worker heartbeat (s); a cell whose worker is silent for 2*S s is retried (default 60)")
    study.add_argument("--sampler_seed", type=int, default=None, help="seed of the grid / TPE sampler")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, fit_args = build_parser().parse_known_args(argv)
    params = [parse_param(p) for p in args.param]
    from focaldet.engine.runs import checked_argv
    from focaldet.tools.sweep_study import SearchRange

    checked_argv(args.config, fit_args)  # a missing, malformed or refused config: one line, before any cell

    if args.trials is not None and args.trials < 1:
        raise ConfigError(f"--trials {args.trials}: need at least 1")
    search = any(isinstance(v, SearchRange) for _, v in params)
    if args.trials is not None and not search:
        raise ConfigError("--trials is for a search (--param KEY=log:LOW:HIGH); a grid runs each of its cells")
    outcomes = run_sweep(args.config, params, args.out, fit_args, storage=args.storage, study_name=args.study_name,
                         trials=args.trials, prune=args.prune, heartbeat=args.heartbeat,
                         sampler_seed=args.sampler_seed)
    failed = [o for o in outcomes if o.status == "failed"]
    keys = [k for k, _ in params]
    print("\n" + table_markdown(keys, outcomes, grid=not search), flush=True)
    written = ", ".join(str(args.out / n) for n in ("results.csv", "table.md", "heatmap.png")
                        [:2 + (len(keys) == 2 and not search)])
    print(f"sweep: {len(outcomes) - len(failed)} of {len(outcomes)} cells finished; wrote {written}", flush=True)
    if failed:
        print(f"sweep: {len(failed)} cell(s) failed: {', '.join(o.cell.name for o in failed)} "
              "(re-run the command to retry them)", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
