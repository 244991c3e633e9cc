"""Processes for the tests that need a process boundary (DDP ranks, a kill, a server, a
second sweep worker), started without paying the imports each time.

A fresh ``python -m focaldet.cli`` spends about 6 s importing torch, Lightning and focaldet
before its first line of work. Here one ``forkserver`` process (the standard library's,
`multiprocessing.set_forkserver_preload`) imports them once per test session, and every
process a test starts is a ``fork`` of it: its own address space, pid, exit code, signals
and stdout/stderr (files), with the test's ``cwd`` and environment, running
``focaldet.cli.main(argv)`` as the ``focaldet`` console script would. The server imports only
(no tensor is computed, no thread pool is started before a fork), as a DataLoader's workers
are forked after their parent's imports.

What a fork does not reproduce is a clean interpreter's start: the tests of that (``focaldet
--help`` with its reader gone, what ``import focaldet.data.cli`` imports, the import layers)
start real processes. ``sys.argv[0]`` is the ``focaldet`` console script, so
Lightning's DDP launcher starts the other ranks as ``python .venv/bin/focaldet ARGS``, as it
does for a user: those ranks are fresh processes.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from helpers import REPO

# what `focaldet fit | validate | export | serve | sweep` import; a module missing here is
# imported by the child itself (slower, still correct)
PRELOAD = ["torch", "lightning.pytorch", "focaldet.cli", "focaldet.engine.lightning_cli", "focaldet.export.cli",
           "focaldet.serve", "focaldet.tools.sweep", "focaldet.tools.equal_budget"]
CONSOLE_SCRIPT = Path(sys.executable).with_name("focaldet")

_context = None


def _forkserver():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def start_server() -> None:
    """Start the import server now (it imports in the background); the first process
    started otherwise waits for those imports."""
    from multiprocessing import forkserver

    _forkserver()
    forkserver.ensure_running()


def _child(target: Callable[..., int | None], args: tuple, argv: list[str], cwd: str, env: dict[str, str],
           out: str, err: str, new_session: bool) -> None:
    """In the forked process: become the process the test asked for, then run ``target``."""
    if new_session:
        os.setsid()
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(file, fd)
        os.close(file)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.stdout.reconfigure(line_buffering=True)  # PYTHONUNBUFFERED, as the tests' processes had
    sys.stderr.reconfigure(line_buffering=True)
    if env.get("PYTHONWARNINGS") in ("ignore", "default", "error", "always", "module", "once"):
        warnings.simplefilter(env["PYTHONWARNINGS"])  # read at interpreter start, which a fork skips
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.argv = argv
    sys.exit(target(*args))


def _focaldet(*args: str) -> int:
    from focaldet.cli import main

    return main(list(args))


def _script(path: str, *args: str) -> None:
    import runpy

    runpy.run_path(path, run_name="__main__")


class WarmProcess:
    """A forked process, used as ``subprocess.Popen`` is: ``pid``, ``poll()``, ``wait()``,
    ``send_signal()``, ``kill()``, ``returncode`` (``-N`` when signal N ended it) and, once it
    ended, ``stdout`` / ``stderr`` (text)."""

    def __init__(self, target: Callable[..., int | None], args: Sequence[Any], argv: list[str],
                 cwd: Path | None = None, env: dict[str, str] | None = None, new_session: bool = False):
        self._tmp = tempfile.TemporaryDirectory(prefix="focaldet-warm-")
        self._out, self._err = (os.path.join(self._tmp.name, n) for n in ("stdout", "stderr"))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
        env = {k: v for k, v in env.items() if v is not None}  # None: unset
        self._process = _forkserver().Process(
            target=_child, args=(target, tuple(args), argv, str(cwd or REPO), env, self._out, self._err, new_session))
        self._process.start()
        self.pid = self._process.pid
        self.args = argv

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._process.exitcode

    def send_signal(self, sig: int) -> None:
        if self._process.exitcode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def _read(self, path: str) -> str:
        try:
            with open(path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:  # it ended before `_child` ran (the fork server's own traceback)
            return ""

    @property
    def stdout(self) -> str:
        return self._read(self._out)

    @property
    def stderr(self) -> str:
        return self._read(self._err)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return self.stdout, self.stderr

    def result(self, timeout: float | None = None) -> subprocess.CompletedProcess:
        """Wait (killing it after ``timeout`` s, then raising ``TimeoutExpired``) and return what
        ``subprocess.run(..., capture_output=True, text=True)`` would."""
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self._process.join()
            raise
        completed = subprocess.CompletedProcess(self.args, self.returncode, self.stdout, self.stderr)
        self._tmp.cleanup()
        return completed


def start_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
              new_session: bool = False) -> WarmProcess:
    """``focaldet ARGS`` in a forked process (see the module docstring); ``env`` adds variables
    (``None`` unsets one),
    ``new_session`` makes it a process group leader (``os.killpg(p.pid, ...)``)."""
    return WarmProcess(_focaldet, args, [str(CONSOLE_SCRIPT), *args], cwd, env, new_session)


def start_script(path: Path, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> WarmProcess:
    """``python PATH ARGS`` in a forked process."""
    return WarmProcess(_script, (str(path), *args), [str(path), *args], cwd, env)


def run_in_child(function: Callable[..., Any], *args: Any, cwd: Path | None = None) -> WarmProcess:
    """``function(*args)`` (a module-level function) in a forked process; its return value is the exit code."""
    return WarmProcess(function, args, [str(CONSOLE_SCRIPT)], cwd)


def spawn(function: Callable[..., Any], args: tuple, nprocs: int) -> None:
    """``torch.multiprocessing.spawn(function, args, nprocs)``, its processes forked from the
    import server (``function(rank, *args)``; an exception in one is raised here)."""
    import torch.multiprocessing as mp

    _forkserver()
    mp.start_processes(function, args=args, nprocs=nprocs, start_method="forkserver")
