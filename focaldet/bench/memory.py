"""Case ``memory``: peak memory of one training step."""

from __future__ import annotations

import copy
import gc
import multiprocessing as mp
import statistics
from collections.abc import Callable
from typing import Any

import torch

from focaldet.bench.harness import Case, Settings, log
from focaldet.bench.models import build_criterion, padded_batch, build_pair, focaldet_train_step, random_targets, \
    torchvision_train_step


def _rss_bytes(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field_name} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# glibc's mmap threshold in the measuring process, fixed (which also turns off its dynamic
# raising): every tensor buffer >= 64 KiB is then mapped when allocated and unmapped when
# freed, so RSS follows live tensor memory rather than the allocator's retention history.
# Measured this way the result repeats to 0.1 MiB; with glibc's defaults it scatters by
# +-30 MB from run to run.
MMAP_THRESHOLD = 64 * 1024
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
# what the measuring processes import before they are forked (see `peak_rss_growth`)
PRELOAD = ["torch", "torchvision", "focaldet.bench.models"]


def _fix_mmap_threshold() -> None:
    """``mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)`` in this process (glibc; elsewhere nothing)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c")).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError, TypeError):
        pass


def _measuring_child(prepare: Callable, args: tuple, queue) -> None:
    try:
        _fix_mmap_threshold()
        torch.set_num_threads(1)  # the peak then cannot depend on how threads interleave
        run = prepare(*args)
        before = _rss_bytes("VmRSS")
        if not _reset_peak_rss():
            before = max(before, _rss_bytes("VmHWM"))  # growth is then a lower bound
        run()
        queue.put(("ok", _rss_bytes("VmHWM") - before))
    except BaseException as e:  # report, never hang the parent
        queue.put(("error", f"{type(e).__name__}: {e}"))


def peak_rss_growth(prepare: Callable[..., Callable[[], Any]], *args, timeout: float = 1800) -> int:
    """Bytes the peak RSS grows by while ``prepare(*args)()`` runs, in a process of its own
    (``prepare`` builds and warms up; what it returns is measured), so that neither side's
    allocator state or caches affect the other: forked from multiprocessing's fork server,
    which imported torch and torchvision once (``PRELOAD``; ``spawn`` where there is none), with
    glibc's mmap threshold fixed and 1 intra-op thread. An error in it is raised here."""
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)  # read when the server starts (one per bench run)
    queue = ctx.Queue()
    proc = ctx.Process(target=_measuring_child, args=(prepare, args, queue))
    proc.start()
    status, value = queue.get(timeout=timeout)
    proc.join()
    if status != "ok":
        raise RuntimeError(f"{getattr(prepare, '__name__', prepare)} failed in its process: {value}")
    return int(value)


def _warm_step(side: str, settings: Settings) -> Callable[[], None]:
    """One training step of one side, warmed up (for `peak_rss_growth`)."""
    settings = copy.copy(settings)
    settings.verbose = False
    step, warm_up = _train_step_fn(side, settings)
    warm_up()
    return step


def _train_step_fn(side: str, settings: Settings) -> tuple[Callable[[], None], Callable[[], None]]:
    """``(step, warm_up)`` of one side (the other model is freed): one training step on the
    benchmark batch, and one on a single 64 px image followed by freeing the gradients,
    which loads what a process initialises lazily on its first step (MKL and oneDNN
    kernels, caches) without leaving large buffers behind."""
    dev = settings.device
    tv, fd = build_pair(settings, settings.size, frozen_bn=True)

    def inputs(n: int, s: int, g: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        images = padded_batch(n, s, gen, settings)
        if side != "focaldet":
            images = images.contiguous()  # torchvision's own layout, NCHW
        sizes = torch.tensor([[s, s]] * n, device=dev)
        return (images, sizes, *random_targets(n, g, s, settings.num_classes, seed + 1, dev))

    if side == "focaldet":
        del tv
        model = fd.train()
        run = focaldet_train_step(fd, build_criterion(fd, settings), settings)
    else:
        del fd
        model = tv.train()
        run = torchvision_train_step(tv, settings)

    main = inputs(settings.batch, settings.size, settings.gt_per_image, settings.seed + 1)
    tiny = inputs(1, 64, 1, settings.seed + 9)

    def warm_up():
        run(*tiny)
        model.zero_grad(set_to_none=True)
        gc.collect()

    gc.collect()
    return (lambda: run(*main)), warm_up


def case_memory(settings: Settings) -> dict[str, float]:
    """Peak memory of one training step: CUDA ``max_memory_allocated`` growth (in process),
    or on CPU the peak RSS growth (VmHWM after - VmRSS before) in a process of its own per
    side (`peak_rss_growth`)."""
    peaks: dict[str, int] = {}
    if settings.device.startswith("cuda"):
        for side in ("focaldet", "torchvision"):
            log(settings, f"memory: {side} (max_memory_allocated)")
            step, warm_up = _train_step_fn(side, settings)
            warm_up()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peaks[side] = torch.cuda.max_memory_allocated() - base
            del step, warm_up
            gc.collect()
            torch.cuda.empty_cache()
        method = "CUDA max_memory_allocated growth of one step, after a 64 px warm-up step"
    else:
        runs = max(1, settings.memory_runs)
        samples: dict[str, list[int]] = {"focaldet": [], "torchvision": []}
        for i in range(runs):
            for side in (("focaldet", "torchvision") if i % 2 == 0 else ("torchvision", "focaldet")):
                value = peak_rss_growth(_warm_step, side, settings)
                samples[side].append(value)
                log(settings, f"memory: run {i + 1}/{runs} {side}: peak RSS growth {value / 2**20:.1f} MiB "
                               "(own process, 1 thread)")
        peaks = {side: int(statistics.median(v)) for side, v in samples.items()}
        method = "peak RSS growth of one step (own process per side, see docs/benchmarks.md)"
    settings.notes["memory"] = method
    return {"focaldet": peaks["focaldet"], "torchvision": peaks["torchvision"],
            "ratio": peaks["torchvision"] / max(peaks["focaldet"], 1)}


CASE = Case(case_memory, unit="MiB", target=1.0)
