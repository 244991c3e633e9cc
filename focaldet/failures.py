"""How a focaldet command fails: one line on stderr, never a traceback.

Every command (``fit``, ``validate``, ``test``, ``predict``, ``data``, ``bench``,
``equal-budget``) runs under :func:`report_errors`: a :class:`~focaldet.errors.FocaldetError`
(bad data, image, config or checkpoint) is printed as ``focaldet: error: <message>`` and the
process exits with status 1. ``FOCALDET_DEBUG=1`` re-raises it with its traceback instead.
Other exceptions are bugs and keep their traceback. Under DDP every process runs the
command, so a rank that fails prints the same line (Lightning's launcher then ends the others).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable

from lightning.pytorch.callbacks import Callback

from focaldet.errors import FocaldetError

DEBUG_ENV = "FOCALDET_DEBUG"


def unwrap_worker_message(message: str) -> str:
    """The original message of an exception PyTorch re-raised from a DataLoader worker.

    PyTorch re-raises a worker's exception in the main process as ``type(exc)(text)`` with
    ``text = "Caught X in DataLoader worker process 0.\\nOriginal Traceback ...\\nmodule.X: msg"``;
    this returns ``"msg [DataLoader worker process 0]"``. Other messages are returned unchanged.
    """
    if not (message.startswith("Caught ") and "\nOriginal Traceback" in message):
        return message
    head, _, trace = message.partition("\n")
    where = head.rstrip(".").split(" in ", 1)[-1]  # "DataLoader worker process 0"
    exc_name = head[len("Caught "):].split(" in ", 1)[0]  # "DataError"
    lines = trace.splitlines()
    # the traceback ends with "pkg.mod.DataError: msg" (msg may span lines): find the last such line
    for i in range(len(lines) - 1, -1, -1):
        name, sep, text = lines[i].partition(": ")
        if sep and (name == exc_name or name.endswith("." + exc_name)):
            text = " ".join([text, *lines[i + 1:]])
            return f"{' '.join(text.split())} [{where}]"
    return f"{' '.join(lines[-1].split()) if lines else head} [{where}]"


def one_line(exc: BaseException) -> str:
    """``exc``'s message on one line (a DataLoader worker's wrapping removed)."""
    text = " ".join(unwrap_worker_message(str(exc)).split())
    return text or type(exc).__name__


def report_errors(command: Callable[..., int | None], *args, **kwargs) -> int:
    """Runs ``command``; returns its exit status, or 1 after printing a focaldet error as one line."""
    global _peer_failure
    _peer_failure = None
    try:
        status = command(*args, **kwargs)
    except FocaldetError as exc:
        if _debug():
            raise
        print(f"focaldet: error: {one_line(exc)}", file=sys.stderr, flush=True)
        return 1
    except Exception:
        if _peer_failure is None or _debug():
            raise
        # another rank failed first and printed its error; this one only saw the broken collective
        print(f"focaldet: stopped: {_peer_failure} (its error is above)", file=sys.stderr, flush=True)
        return 1
    return 0 if status is None else status


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


# set when this process's exception followed another rank's failure (that rank printed the error)
_peer_failure: str | None = None
PEER_WAIT_S = 10.0  # how long the launching process waits for a failing peer's exit status


class StopAllRanks(Callback):
    """Ends every DDP process when one fails, so none hangs in a collective until its timeout.

    On an exception in the process that launched the others (Lightning's subprocess launcher,
    global rank 0 on its node), this waits up to ``PEER_WAIT_S`` seconds for a child that
    failed first (then the exception here is only the broken collective, and
    :func:`report_errors` stays silent: the failed rank printed its own line), then kills the
    children that are left. Lightning itself kills them on Ctrl-C only; its observer thread
    kills everything 5 s after a child fails, but the parent's own error (a gloo "Connection
    closed by peer" traceback) usually comes first.
    """

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        global _peer_failure
        from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

        launcher = getattr(trainer.strategy, "launcher", None)
        if not isinstance(launcher, _SubprocessScriptLauncher) or not launcher.procs:
            return
        procs = launcher.procs
        if not isinstance(exception, FocaldetError):  # likely a consequence: look for a failed peer
            deadline = time.monotonic() + PEER_WAIT_S
            while time.monotonic() < deadline:
                codes = [p.poll() for p in procs]
                if any(codes) or all(code is not None for code in codes):  # one failed, or all ended
                    break
                time.sleep(0.05)
            failed = [(rank, p.returncode) for rank, p in enumerate(procs, start=1) if p.poll()]
            if failed:
                _peer_failure = ", ".join(f"rank {rank} exited with status {code}" for rank, code in failed)
        launcher.kill(signal.SIGKILL)  # children still running (skips those that ended)
        for p in procs:
            p.wait()
