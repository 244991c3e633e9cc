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
import sys
from collections.abc import Callable

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


def report_errors(command: Callable[..., int | None], *args, prog: str = "focaldet", **kwargs) -> int:
    """Runs ``command``; returns its exit status, or 1 after printing a focaldet error as one line,
    ``PROG: error: MESSAGE`` (every command and subcommand reports through here; usage errors
    are argparse's, exit status 2)."""
    global _peer_failure
    _peer_failure = None
    try:
        status = command(*args, **kwargs)
    except FocaldetError as exc:
        if _debug():
            raise
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr, flush=True)
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
