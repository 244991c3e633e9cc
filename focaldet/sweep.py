"""``focaldet sweep``: one training run per cell of a parameter grid, evaluated on the val split,
tabulated as the focal loss paper's Table 1.

::

    focaldet sweep -c configs/study_synth.yaml -c configs/losses/sigmoid_focal.yaml \\
        --param model.cls_loss.init_args.gamma=0,0.5,1,2,5 \\
        --param model.cls_loss.init_args.alpha=0.25,0.5,0.75 --out runs/sweep [fit arguments]

Keys are ``focaldet fit``'s dotted keys; values are YAML scalars (numbers, strings, ``null``),
comma-separated (commas inside ``[...]`` or ``{...}`` do not split). The key ``config`` adds a
config file per cell (``--param config=configs/losses/bce.yaml,configs/losses/varifocal.yaml``).
Other arguments go to every run as to ``fit``. The cells run one after the other; each run is
``focaldet fit`` (``focaldet.runs``) followed by one validation of the final weights. Written::

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
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

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


def parse_param(text: str) -> tuple[str, list[Any]]:
    """``"KEY=V1,V2"`` -> ``(KEY, [v1, v2])``; raises ``ConfigError`` naming the bad part."""
    key, sep, values = text.partition("=")
    key = key.strip().removeprefix("--")
    if not sep or not key or not values.strip():
        raise ConfigError(f"--param {text!r}: expected KEY=V1,V2,... (e.g. model.cls_loss.init_args.gamma=0,2)")
    if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
        raise ConfigError(f"--param {text!r}: {key!r} is not a dotted key like model.cls_loss.init_args.gamma")
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
    """``model.cls_loss.init_args.gamma`` -> ``gamma`` (the full key where the last parts collide)."""
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
    status: str  # "ok" | "failed" | "pending"
    result: dict | None = None
    error: str | None = None
    skipped: bool = field(default=False)  # finished by an earlier invocation


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)  # a reader sees the old file or the complete new one, never half of one


def _finished(path: Path, record: dict) -> dict | None:
    """The stored result of a cell if it was made with the same configs and arguments."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    same = stored.get("configs") == record["configs"] and stored.get("args") == record["args"]
    return stored.get("result") if same else None


def _default_run(configs: Sequence[str], args: Sequence[str], root_dir: Path) -> dict:
    from focaldet.runs import train_and_evaluate

    return train_and_evaluate(configs, args, root_dir).to_dict()


def run_sweep(configs: Sequence[str], params: Sequence[tuple[str, Sequence[Any]]], out: str | Path,
              fit_args: Sequence[str] = (), run: Callable[[Sequence[str], Sequence[str], Path], dict] | None = None,
              log: Callable[[str], None] = print) -> list[CellOutcome]:
    """Run (or skip, when finished) every cell, writing the outputs after each; returns the outcomes.

    ``run(configs, args, root_dir) -> RunResult.to_dict()`` trains and evaluates one cell
    (default: ``focaldet.runs.train_and_evaluate``); tests pass a stand-in.
    """
    run = run or _default_run
    out = Path(out)
    cells = expand_grid(params)
    outcomes = [CellOutcome(c, "pending") for c in cells]
    keys = [k for k, _ in params]
    n = len(cells)
    for outcome in outcomes:
        cell = outcome.cell
        cell_dir = out / "cells" / cell.name
        record = {"cell": cell.name, "values": cell.values, "configs": [*configs, *cell.configs],
                  "args": [*fit_args, *cell.args]}
        done = _finished(cell_dir / RESULT_FILE, record)
        if done is not None:
            outcome.status, outcome.result, outcome.skipped = "ok", done, True
            log(f"sweep: cell {cell.index + 1}/{n} {cell.name}: finished earlier, skipped "
                f"(AP {100 * done['stats']['mAP']:.1f})")
            continue
        log(f"sweep: cell {cell.index + 1}/{n} {cell.name}: running")
        try:
            result = run(record["configs"], record["args"], cell_dir / "run")
        except Exception as exc:  # noqa: BLE001 -- any failure of one cell; Ctrl-C still stops the sweep
            outcome.status, outcome.error = "failed", f"{type(exc).__name__}: {one_line(exc)}"
            log(f"sweep: cell {cell.index + 1}/{n} {cell.name}: FAILED: {outcome.error}")
            _write_json_atomic(cell_dir / "failed.json", {**record, "error": outcome.error})
        else:
            outcome.status, outcome.result = "ok", result
            _write_json_atomic(cell_dir / RESULT_FILE, {**record, "result": result})
            (cell_dir / "failed.json").unlink(missing_ok=True)
            log(f"sweep: cell {cell.index + 1}/{n} {cell.name}: AP {100 * result['stats']['mAP']:.1f} "
                f"in {result['steps']} steps, {result['wall_s']:.0f} s")
        write_outputs(out, keys, outcomes)
    write_outputs(out, keys, outcomes)
    return outcomes


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
    return "failed" if o is not None and o.status == "failed" else "-"


def table_markdown(keys: Sequence[str], outcomes: Sequence[CellOutcome]) -> str:
    """``table.md``: AP / AP50 / AP75 (in %) per cell as Table 1a; with two parameters also
    Table 1b (for each value of the first, the value of the second with the best AP) and the
    AP grid (rows: first parameter, columns: second)."""
    short = _short_keys(keys)
    lines = ["# Sweep", "", "AP, AP50, AP75 in % (COCOeval on the val split, final weights).", "",
             "| " + " | ".join([*short, *TABLE_HEADERS]) + " |", "|" + "---|" * len(short) + "---:|" * 3]
    for o in outcomes:
        stats = [_pct(o.result, s) for s in TABLE_STATS] if o.result else [_status_cell(o)] * 3
        lines.append("| " + " | ".join([*(o.cell.labels[k] for k in keys), *stats]) + " |")
    if len(keys) == 2:
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


def write_outputs(out: Path, keys: Sequence[str], outcomes: Sequence[CellOutcome]) -> list[Path]:
    """``results.csv``, ``table.md`` and (two parameters) ``heatmap.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    columns, rows = results_rows(keys, outcomes)
    tmp = out / ".results.csv.tmp"
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out / "results.csv")
    (out / "table.md").write_text(table_markdown(keys, outcomes))
    written = [out / "results.csv", out / "table.md"]
    if len(keys) == 2:
        written.append(write_heatmap(keys, outcomes, out / "heatmap.png"))
    return written


# ---------------------------------------------------------------------------------- command
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, prog="focaldet sweep", description="Train and evaluate one run per cell of a parameter grid.",
        epilog="Other arguments (--trainer.*, --model.*, --data.*) go to every run, as to `focaldet fit`.")
    parser.add_argument("-c", "--config", action="append", required=True,
                        help="training config; repeat to layer configs as `fit -c A -c B` does")
    parser.add_argument("--param", action="append", required=True, metavar="KEY=V1,V2,...",
                        help="a dotted key of `fit` and its values (YAML scalars); repeat for a grid; "
                             "the key `config` adds a config file per cell")
    parser.add_argument("--out", required=True, type=Path, help="output folder (re-run to resume)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, fit_args = build_parser().parse_known_args(argv)
    params = [parse_param(p) for p in args.param]
    outcomes = run_sweep(args.config, params, args.out, fit_args)
    failed = [o for o in outcomes if o.status == "failed"]
    keys = [k for k, _ in params]
    print("\n" + table_markdown(keys, outcomes), flush=True)
    written = ", ".join(str(args.out / n) for n in ("results.csv", "table.md", "heatmap.png")[:2 + (len(keys) == 2)])
    print(f"sweep: {len(outcomes) - len(failed)} of {len(outcomes)} cells finished; wrote {written}", flush=True)
    if failed:
        print(f"sweep: {len(failed)} cell(s) failed: {', '.join(o.cell.name for o in failed)} "
              "(re-run the command to retry them)", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
