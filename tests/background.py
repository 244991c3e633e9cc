"""The session's slowest shared artifacts, built in a process of their own while other tests run.

They are single-threaded work: an ONNX export is 15-25 s of Python tracing (``torch.export``,
then the ONNX exporter's decompositions), the tiny training run and the ``.pt2`` export about
8 s each, the own-data walkthrough 20 s, the quick benchmark 16 s. On CI's 2 cores the tests
keep computing on one while this process works on the other.

`Jobs.start(names)` forks one process from the import server (`warm.run_in_child`) that builds
those jobs (and the ones they need) in `JOBS` order, each writing ``<name>.json`` (its result)
or ``<name>.error`` (its traceback) when it ends; `Jobs.result(name)` waits for that file.
conftest starts the jobs that the selected tests need at the first test and runs those tests
last (`pytest_collection_modifyitems`), by when their artifacts are ready. A job that failed
fails the tests that need it, with its traceback; a job not started is built when asked for,
in the test process.

A builder is ``builder(out: Path, synth: SyntheticCoco, done: dict) -> dict`` (JSON values),
``done`` holding the results of the jobs it needs.
"""

from __future__ import annotations

import importlib
import json
import threading
import time
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from focaldet.atomic import atomic_write

# job name -> ("module:builder", the jobs whose results it uses), in the order they are built
JOBS: dict[str, tuple[str, tuple[str, ...]]] = {
    "tiny_run": ("artifacts:fit_tiny_run", ()),
    "tiny_pt2": ("artifacts:export_tiny_pt2", ("tiny_run",)),
    "tiny_onnx": ("artifacts:export_tiny_onnx", ("tiny_run",)),
    "mobilenet_onnx": ("artifacts:export_mobilenet", ()),
    "walkthrough": ("test_own_data_walkthrough:run_walkthrough", ()),
    "bench_quick": ("test_bench:run_quick_bench", ()),
    "doors": ("test_inference_doors:collect_doors", ("tiny_run", "tiny_pt2", "tiny_onnx")),
    "ema_run": ("test_ema:fit_and_validate_with_ema", ()),
    "cli_run": ("test_cli:fit_validate_test_predict", ()),
    "evaluator_run": ("test_evaluator_cli:validate_then_predict", ()),
    "compiled_focal_loss": ("test_bench:compile_focal_loss", ()),
    "ddp_failures": ("test_ddp:fail_on_one_rank", ()),
    "equal_budget": ("test_equal_budget:run_equal_budget", ()),
}


def with_needs(names: Iterable[str]) -> list[str]:
    """``names`` and the jobs they need, in `JOBS` order."""
    wanted = set(names)
    for name in reversed(list(JOBS)):
        if name in wanted:
            wanted.update(JOBS[name][1])
    return [n for n in JOBS if n in wanted]


def _run(name: str, out: Path, synth: Any, done: dict[str, Any]) -> dict[str, Any]:
    module, function = JOBS[name][0].split(":")
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    return getattr(importlib.import_module(module), function)(folder, synth, {n: done[n] for n in JOBS[name][1]})


def build(names: list[str], out: str, synth: Any, threads: int) -> int:
    """In the child: build ``names`` in order, writing each one's result or traceback."""
    import torch

    torch.set_num_threads(threads)  # the tests' own (conftest.TEST_THREADS)
    done: dict[str, Any] = {}
    for name in names:
        if not all(n in done for n in JOBS[name][1]):
            (Path(out) / f"{name}.error").write_text(f"a job it needs failed: {JOBS[name][1]}")
            continue
        try:
            done[name] = _run(name, Path(out), synth, done)
        except BaseException:  # noqa: BLE001 - reported to the tests that need it
            (Path(out) / f"{name}.error").write_text(traceback.format_exc())
            continue
        with atomic_write(Path(out) / f"{name}.json") as f:  # whole when the tests see it
            json.dump(done[name], f)
    return 0


class Jobs:
    """The background jobs of one session: `start` once, `result` per job, `stop` at the end."""

    def __init__(self, out: Path, synth: Any):
        self.out, self.synth = out, synth
        self.started: list[str] = []
        self.process = None
        self._starting: threading.Thread | None = None
        self._here: dict[str, Any] = {}  # jobs built in this process

    def start(self, names: Iterable[str], threads: int) -> None:
        """Start building ``names`` (and what they need); returns at once (the fork server may
        still be importing: a thread waits for it)."""
        from warm import run_in_child

        def fork() -> None:
            self.process = run_in_child(build, self.started, str(self.out), self.synth, threads)

        self.started = with_needs(names)
        if self.started:
            self._starting = threading.Thread(target=fork, name="background-jobs", daemon=True)
            self._starting.start()

    def result(self, name: str, timeout: float = 900) -> dict[str, Any]:
        """``name``'s result, waiting for the background process (or building it here)."""
        if name not in self.started:
            if name not in self._here:
                done = {n: self.result(n) for n in JOBS[name][1]}
                self._here[name] = json.loads(json.dumps(_run(name, self.out / "here", self.synth, done)))
            return self._here[name]
        self._starting.join()
        deadline = time.monotonic() + timeout
        done, error = self.out / f"{name}.json", self.out / f"{name}.error"
        while not done.exists():
            if error.exists():
                raise RuntimeError(f"background job {name} failed:\n{error.read_text()}")
            if self.process.poll() is not None and not done.exists():  # it may have written it since
                raise RuntimeError(f"background job {name}: its process ended ({self.process.returncode}) "
                                   f"first:\n{self.process.stderr[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"background job {name}: not done after {timeout} s")
            time.sleep(0.05)
        return json.loads(done.read_text())

    def stop(self) -> None:
        if self._starting is not None:
            self._starting.join()
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
