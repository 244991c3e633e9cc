"""``focaldet sweep``: grid expansion, value parsing, resume, failing cells, table layout
(with a stand-in run function), and one real two-cell sweep of two steps each."""

from __future__ import annotations

import csv
import json
import time
from types import SimpleNamespace

import pytest

from focaldet.errors import ConfigError, NonFiniteLossError
from focaldet.evaluation.coco import STAT_NAMES
from focaldet.tools.sweep import (
    expand_grid, parse_param, parse_value, run_sweep, split_values, table_markdown,
)
from helpers import run_cli, tiny_config

GAMMA, ALPHA = "model.criterion.cls_loss.gamma", "model.criterion.cls_loss.alpha"


def fake_result(ap: float) -> dict:
    stats = {name: ap / (i + 1) for i, name in enumerate(STAT_NAMES)}
    return {"stats": stats, "per_class": {"circle": ap, "square": ap / 2},
            "per_class_ap50": {"circle": 2 * ap, "square": ap}, "steps": 3, "train_s": 1.0, "wall_s": 1.5}


def fake_key(configs, args) -> str:
    """Stands in for resolving fit's config: the arguments themselves (no files to read)."""
    return json.dumps([list(configs), list(args)])


def sweep(*args, **kwargs):
    """``run_sweep`` with the stand-in resolver, quiet, a 1 s heartbeat."""
    kwargs.setdefault("log", lambda s: None)
    return run_sweep(*args, resolve=fake_key, heartbeat=1, **kwargs)


class FakeRun:
    """Stands in for training: AP from the cell's arguments; records the calls; fails on demand."""

    def __init__(self, fail_when: str | None = None):
        self.calls, self.fail_when = [], fail_when

    def __call__(self, configs, args, root_dir, callbacks=()):
        self.calls.append((list(configs), list(args), root_dir))
        if self.fail_when is not None and self.fail_when in args:
            raise NonFiniteLossError("non-finite loss at step 2")
        values = dict(zip(args[::2], args[1::2]))
        return fake_result(0.1 + float(values.get(f"--{GAMMA}", 0)) / 10 + float(values.get(f"--{ALPHA}", 0)) / 100)


def test_values_are_yaml_scalars_and_commas_in_brackets_do_not_split():
    assert [parse_value(v) for v in ("0", "0.5", "1e-3", "null", "abc", "true", "data/x.json")] == [
        0, 0.5, 0.001, None, "abc", True, "data/x.json"]
    assert split_values("0, 0.5,[16,32],{a: 1, b: 2}") == ["0", "0.5", "[16,32]", "{a: 1, b: 2}"]
    assert parse_param(f"--{GAMMA}=0,0.5,2") == (GAMMA, [0, 0.5, 2])
    for bad in ("gamma", "=1,2", "gamma=", "gamma=1,,2", "gamma=1,1", "model..x=1"):
        with pytest.raises(ConfigError):
            parse_param(bad)


def test_grid_expands_first_parameter_slowest_with_short_names_and_cli_arguments():
    cells = expand_grid([(GAMMA, [0, 2]), (ALPHA, [0.25, None]), ("data.train_ann", ["a/noisy20.json"])])
    assert [c.name for c in cells] == ["gamma=0,alpha=0.25,train_ann=noisy20", "gamma=0,alpha=null,train_ann=noisy20",
                                       "gamma=2,alpha=0.25,train_ann=noisy20", "gamma=2,alpha=null,train_ann=noisy20"]
    assert cells[1].args == (f"--{GAMMA}", "0", f"--{ALPHA}", "null", "--data.train_ann", "a/noisy20.json")
    assert cells[3].values == {GAMMA: 2, ALPHA: None, "data.train_ann": "a/noisy20.json"}
    cfg = expand_grid([("config", ["configs/losses/bce.yaml", "configs/losses/varifocal.yaml"])])
    assert [(c.name, c.configs, c.args) for c in cfg] == [
        ("config=bce", ("configs/losses/bce.yaml",), ()), ("config=varifocal", ("configs/losses/varifocal.yaml",), ())]
    with pytest.raises(ConfigError):
        expand_grid([(GAMMA, [1]), (GAMMA, [2])])


def test_resume_skips_finished_cells_and_reruns_failed_or_changed_ones(tmp_path):
    params = [(GAMMA, [0, 2]), (ALPHA, [0.25, 0.75])]
    run = FakeRun(fail_when="2")
    first = sweep(["base.yaml"], params, tmp_path, ["--trainer.max_steps", "3"], run=run)
    assert [o.status for o in first] == ["ok", "ok", "failed", "failed"] and len(run.calls) == 4
    assert run.calls[0] == (["base.yaml"], ["--trainer.max_steps", "3", f"--{GAMMA}", "0", f"--{ALPHA}", "0.25"],
                            tmp_path / "cells" / "gamma=0,alpha=0.25" / "run")
    assert sorted(p.parent.name for p in tmp_path.glob("cells/*/result.json")) == ["gamma=0,alpha=0.25",
                                                                                   "gamma=0,alpha=0.75"]
    rerun = FakeRun()  # a killed or partly failed sweep, run again: only the unfinished cells train
    second = sweep(["base.yaml"], params, tmp_path, ["--trainer.max_steps", "3"], run=rerun)
    assert [c[1][-3] for c in rerun.calls] == ["2", "2"] and all(o.status == "ok" for o in second)
    assert [o.skipped for o in second] == [True, True, False, False]
    assert not list(tmp_path.glob("cells/*/failed.json"))
    changed = FakeRun()  # other fit arguments: the stored results are stale
    sweep(["base.yaml"], params, tmp_path, ["--trainer.max_steps", "4"], run=changed)
    assert len(changed.calls) == 4


def test_failing_cell_is_reported_on_one_line_and_the_sweep_goes_on(tmp_path):
    lines = []
    outcomes = sweep(["base.yaml"], [(GAMMA, [0, 2, 5])], tmp_path, run=FakeRun(fail_when="2"), log=lines.append)
    assert [o.status for o in outcomes] == ["ok", "failed", "ok"]
    assert "sweep: cell 1/3 gamma=0: running" in lines
    assert "sweep: cell 2/3 gamma=2: FAILED: NonFiniteLossError: non-finite loss at step 2" in lines
    with (tmp_path / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r[GAMMA], r["status"]) for r in rows] == [("0", "ok"), ("2", "failed"), ("5", "ok")]
    assert rows[1]["error"].startswith("NonFiniteLossError") and rows[1]["mAP"] == ""
    assert float(rows[2]["mAP"]) == pytest.approx(0.6) and float(rows[2]["AP/square"]) == pytest.approx(0.3)
    assert list(rows[0])[:2 + len(STAT_NAMES) + 1] == ["cell", GAMMA, "status", *STAT_NAMES]
    assert json.loads((tmp_path / "cells" / "gamma=2" / "failed.json").read_text())["error"].startswith("NonFinite")
    assert "| 2 | failed | failed | failed |" in (tmp_path / "table.md").read_text()


def test_table_has_paper_columns_best_alpha_per_gamma_and_grid_and_heatmap(tmp_path):
    outcomes = sweep(["base.yaml"], [(GAMMA, [0, 2]), (ALPHA, [0.25, 0.75])], tmp_path, run=FakeRun())
    table = table_markdown([GAMMA, ALPHA], outcomes)
    # AP = 0.1 + gamma / 10 + alpha / 100; AP50 = AP / 2, AP75 = AP / 3 (fake_result), in %
    assert "| gamma | alpha | AP | AP50 | AP75 |" in table
    assert "| 2 | 0.25 | 30.3 | 15.1 | 10.1 |" in table
    best = table.split("Table 1b")[1]
    assert "| 0 | 0.75 | 10.8 | 5.4 | 3.6 |" in best and "| 2 | 0.75 | 30.8 | 15.4 | 10.3 |" in best
    assert "| gamma \\ alpha | 0.25 | 0.75 |" in table and "| 2 | 30.3 | 30.8 |" in table
    assert (tmp_path / "table.md").read_text() == table
    assert (tmp_path / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    one = table_markdown([GAMMA], sweep(["b.yaml"], [(GAMMA, [1])], tmp_path / "one", run=FakeRun()))
    assert "Table 1b" not in one and "| 1 | 20.0 | 10.0 | 6.7 |" in one
    assert not (tmp_path / "one" / "heatmap.png").exists()


@pytest.mark.slow
def test_real_two_cell_sweep_trains_evaluates_and_resumes(tmp_path, synth_coco):
    config = tiny_config(tmp_path, synth_coco, **{"trainer.max_steps": 2, "trainer.val_check_interval": 100,
                                                 "trainer.num_sanity_val_steps": 0})
    out = tmp_path / "sw"
    args = ("sweep", "-c", str(config), "-c", "configs/losses/sigmoid_focal.yaml",
            "--param", f"{GAMMA}=0,abc", "--out", str(out), "--trainer.limit_val_batches", "1")
    proc = run_cli(*args)
    assert proc.returncode == 1, proc.stderr[-3000:]  # the bad value failed, the sweep went on
    assert "sweep: cell 1/2 gamma=0: running" in proc.stdout
    assert "sweep: cell 2/2 gamma=abc: FAILED: ConfigError: bad run arguments" in proc.stdout
    result = json.loads((out / "cells" / "gamma=0" / "result.json").read_text())["result"]
    assert result["steps"] == 2 and set(result["stats"]) == set(STAT_NAMES)
    assert set(result["per_class"]) == {"circle", "square", "triangle", "cross"}
    proc = run_cli(*args)
    assert "gamma=0: finished earlier, skipped" in proc.stdout


# ----------------------------------------------------------------------------- the Optuna study
@pytest.mark.slow
def test_one_and_one_point_zero_are_one_cell_and_an_edited_config_is_a_new_one(tmp_path, synth_coco):
    """Cells are keyed on fit's resolved configuration (the real resolver; stand-in training)."""
    config = tiny_config(tmp_path / "cfg", synth_coco)
    lines, run = [], FakeRun()
    outcomes = run_sweep([str(config)], [("model.optimizer.lr", [1, 1.0, 0.5])], tmp_path / "sw", run=run,
                         log=lines.append, heartbeat=1)
    assert len(run.calls) == 2 and [c[1][-1] for c in run.calls] == ["1", "0.5"]
    assert [o.status for o in outcomes] == ["ok", "ok", "ok"] and outcomes[1].result == outcomes[0].result
    assert "sweep: cell 2/3 lr=1.0: the same configuration as cell lr=1, not run again" in lines
    again = FakeRun()  # the same sweep again: nothing to run
    run_sweep([str(config)], [("model.optimizer.lr", [1, 1.0, 0.5])], tmp_path / "sw", run=again, log=lambda s: None,
              heartbeat=1)
    assert again.calls == []
    config.write_text(config.read_text().replace("fpn_channels: 32", "fpn_channels: 16"))  # same name, new contents
    edited = FakeRun()
    run_sweep([str(config)], [("model.optimizer.lr", [1, 1.0, 0.5])], tmp_path / "sw", run=edited, log=lambda s: None,
              heartbeat=1)
    assert len(edited.calls) == 2


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_a_killed_workers_cell_is_retried_by_the_next_worker(tmp_path):
    """A trial left RUNNING by a worker that stopped beating is failed after the grace period
    (2 heartbeats) and retried; every cell runs once in the live worker."""
    import optuna

    from focaldet.tools.sweep_study import default_storage, open_storage

    params = [(GAMMA, [0, 2]), (ALPHA, [0.25, 0.75])]
    names = [c.name for c in expand_grid(params)]
    storage = open_storage(default_storage(tmp_path), heartbeat=1)
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize",
                                sampler=optuna.samplers.GridSampler({"cell": names}))
    dead = study.ask()  # what a worker killed mid-cell leaves: a RUNNING trial, one old heartbeat
    dead_cell = dead.suggest_categorical("cell", names)
    dead.set_user_attr("worker", "gone:1")
    storage.record_heartbeat(dead._trial_id)
    time.sleep(2.5)
    lines, run = [], FakeRun()
    outcomes = sweep(["base.yaml"], params, tmp_path, run=run, study_name="s", log=lines.append)
    assert all(o.status == "ok" for o in outcomes) and len(run.calls) == 4
    assert sorted(c[2].parent.name for c in run.calls) == sorted(names)
    trials = study.get_trials()
    assert trials[0].state == optuna.trial.TrialState.FAIL
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retried) == 1 and retried[0].params["cell"] == dead_cell
    assert retried[0].state == optuna.trial.TrialState.COMPLETE


def test_search_mode_samples_the_range_for_the_number_of_trials(tmp_path):
    params = [parse_param("model.optimizer.lr=log:1e-4:1e-2"), parse_param(f"{GAMMA}=0,2")]
    run = FakeRun()
    outcomes = sweep(["base.yaml"], params, tmp_path, run=run, trials=3, sampler_seed=0)
    assert len(run.calls) == 3 and [o.cell.name for o in outcomes] == ["trial-0000", "trial-0001", "trial-0002"]
    for o in outcomes:
        assert o.status == "ok" and 1e-4 <= o.cell.values["model.optimizer.lr"] <= 1e-2
        assert o.cell.values[GAMMA] in (0, 2)
    with (tmp_path / "results.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 3
    assert not (tmp_path / "heatmap.png").exists()
    for bad in ("x=log:0:1", "x=int:5:1", "x=float:a:1", "config=log:1:2"):
        with pytest.raises(ConfigError):
            parse_param(bad)


class ReportingRun(FakeRun):
    """Reports three validations of val mAP through the sweep's callbacks, as fit would."""

    def __call__(self, configs, args, root_dir, callbacks=()):
        result = super().__call__(configs, args, root_dir)
        module = SimpleNamespace(last_eval=SimpleNamespace(stats=result["stats"]))
        for step in (10, 20, 30):
            for cb in callbacks:
                cb.on_validation_end(SimpleNamespace(sanity_checking=False, global_step=step), module)
        return result


def test_prune_stops_a_cell_below_the_median_at_a_validation(tmp_path):
    outcomes = sweep(["base.yaml"], [(GAMMA, [5, 4, 0])], tmp_path, run=ReportingRun(), prune=True)
    assert [o.status for o in outcomes] == ["ok", "ok", "pruned"]  # AP 0.6, 0.5, then 0.1 < the median
    assert "pruned" in (tmp_path / "table.md").read_text()


WORKER = """
import json, os, sys, time
sys.path.insert(0, {tests!r})
from focaldet.tools.sweep import run_sweep
from test_sweep import GAMMA, ALPHA, fake_key, fake_result

def run(configs, args, root_dir, callbacks=()):
    with open({calls!r}, "a") as f:
        f.write(json.dumps([os.getpid(), root_dir.parent.name]) + "\\n")
    time.sleep(2)
    return fake_result(0.5)

outcomes = run_sweep(["base.yaml"], [(GAMMA, [0, 2]), (ALPHA, [0.25, 0.75])], {out!r}, run=run, resolve=fake_key,
                     log=print)
sys.exit(0 if all(o.status == "ok" for o in outcomes) else 1)
"""


@pytest.mark.slow
def test_two_processes_on_one_sqlite_study_run_each_cell_once(tmp_path):
    from pathlib import Path

    from warm import start_script

    calls, out = tmp_path / "calls.jsonl", tmp_path / "sw"
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent), calls=str(calls), out=str(out)))
    procs = [start_script(script) for _ in range(2)]  # two workers, each a process of its own
    logs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    ran = [json.loads(line) for line in calls.read_text().splitlines()]
    assert sorted(cell for _, cell in ran) == sorted(c.name for c in expand_grid([(GAMMA, [0, 2]), (ALPHA, [0.25, 0.75])]))
    with (out / "results.csv").open() as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["ok"] * 4


def test_a_missing_or_malformed_config_is_one_line_before_any_cell(tmp_path):
    from focaldet.errors import ConfigError
    from focaldet.tools.sweep import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    for config, message in ((bad, r"bad.yaml: not valid YAML"), (tmp_path / "nope.yaml", r"nope.yaml: no such config")):
        with pytest.raises(ConfigError, match=message):
            main(["-c", str(config), "--param", "model.model.fpn_channels=32", "--out", str(tmp_path / "sw")])
    assert not (tmp_path / "sw").exists()
