"""Lightning callbacks of focaldet's own failure handling (kept apart from `focaldet.failures`,
which the Lightning-free ``focaldet data ...`` tools import)."""

from __future__ import annotations

import signal
import time

from lightning.pytorch.callbacks import Callback

from focaldet import failures
from focaldet.errors import FocaldetError
from focaldet.failures import PEER_WAIT_S

__all__ = ["StopAllRanks"]


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
                failures._peer_failure = ", ".join(f"rank {rank} exited with status {code}" for rank, code in failed)
        launcher.kill(signal.SIGKILL)  # children still running (skips those that ended)
        for p in procs:
            p.wait()
