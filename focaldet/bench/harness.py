"""The benchmark harness: settings, alternating timed calls, FLOP counting, the detection
comparison the cases report, and the results table. Knows no case."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# <repo>/../shared/data/bccd, as the tests and configs/bccd.yaml expect it
BCCD_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "bccd"


@dataclass
class Settings:
    """Sizes of every case (``--quick`` shrinks them)."""

    device: str = "cpu"
    amp: str | None = None  # "bf16" | "fp16"
    compile: bool = False  # focaldet's focal loss through torch.compile
    channels_last: bool = True  # focaldet's model in NHWC (its default); --channels-first turns it off
    fuse_bn: bool = True  # inference: focaldet's frozen BN folded into the convolutions; --keep-bn turns it off
    num_classes: int = 80
    # train_step / inference / memory
    size: int = 320
    batch: int = 2
    gt_per_image: int = 10
    # loss / postprocess
    loss_size: int = 512
    loss_batch: int = 8
    loss_gt: int = 50
    # data
    data_dir: Path | None = None
    data_batch: int = 8
    data_images: int = 0  # the first N train images only; 0 = the whole train split
    workers: int = 2
    # eval
    eval_images: int = 2000
    eval_dets: int = 100
    # memory: a process of its own per side (median); the measurement repeats to 0.1 MiB
    memory_runs: int = 1
    # harness
    warmup: int = 1
    repeats: int = 5
    seed: int = 0
    threads: int = 0  # torch.set_num_threads; 0 = torch's default
    verbose: bool = True
    notes: dict[str, str] = field(default_factory=dict)

    @classmethod
    def quick(cls, **kw) -> Settings:
        return cls(size=128, batch=1, gt_per_image=4, loss_size=256, loss_batch=2, loss_gt=10, data_images=16,
                   data_batch=4, eval_images=60, eval_dets=20, warmup=1, repeats=2, **kw)


def log(settings: Settings, msg: str) -> None:
    if settings.verbose:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Case:
    """One benchmark case: ``run(settings) -> {"focaldet": x, "torchvision": y, "ratio": r}``
    (the ratio > 1 favours focaldet), the unit of x and y, and the ratio aimed at
    (docs/benchmarks.md "Targets"); ``gpu_target`` when it differs on a GPU."""

    run: Callable[[Settings], dict[str, float]]
    unit: str
    target: float
    gpu_target: float | None = None


# --------------------------------------------------------------------------- harness
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], device: str) -> float:
    gc.collect(1)  # the young garbage of the last call; a full collection costs ~0.3 s in a big process (pytest)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # as timeit does: no collection pauses inside a measurement
    try:
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - start
    finally:
        if gc_was_enabled:
            gc.enable()


def compare(name: str, focaldet_fn: Callable[[], Any], torchvision_fn: Callable[[], Any], settings: Settings,
            before: Callable[[], Any] | None = None) -> dict[str, float]:
    """Median seconds of the two sides: ``warmup`` untimed calls each, then ``repeats``
    timed calls each, alternating ABBA so that load drift and cache state favour neither.
    ``before`` runs untimed ahead of every call (e.g. clearing gradients)."""
    sides = {"focaldet": focaldet_fn, "torchvision": torchvision_fn}
    for i in range(settings.warmup):
        for side, fn in sides.items():
            log(settings, f"{name}: warm-up {i + 1}/{settings.warmup} {side}")
            if before is not None:
                before()
            _timed(fn, settings.device)
    times: dict[str, list[float]] = {side: [] for side in sides}
    for i in range(settings.repeats):
        order = list(sides) if i % 2 == 0 else list(sides)[::-1]
        for side in order:
            if before is not None:
                before()
            times[side].append(_timed(sides[side], settings.device))
        log(settings, f"{name}: repeat {i + 1}/{settings.repeats}  " + "  ".join(
            f"{side} {times[side][-1]:.4f}s" for side in sides))
    fd, tv = statistics.median(times["focaldet"]), statistics.median(times["torchvision"])
    return {"focaldet": fd, "torchvision": tv, "ratio": tv / fd}


# Dense bf16/fp16 tensor-core peaks (TFLOP/s, from the vendor's data sheets) by device name,
# for the share of the peak a training step reaches under --amp.
GPU_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


def step_flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations of one call of ``fn`` (forward and backward included), as
    ``torch.utils.flop_counter`` counts them: matmuls and convolutions only."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _gpu_peak_tflops(settings: Settings) -> float | None:
    if not settings.device.startswith("cuda") or settings.amp is None:
        return None
    name = torch.cuda.get_device_name(torch.device(settings.device))
    return next((peak for key, peak in GPU_PEAK_TFLOPS.items() if key in name), None)


def flops_note(flops: dict[str, int], seconds: dict[str, float], settings: Settings) -> str:
    """``"45 GFLOP/step; 0.041 / 0.036 TFLOP/s"`` (focaldet / torchvision), plus the share
    of the GPU's peak under AMP when the GPU is known."""
    rates = {side: flops[side] / seconds[side] / 1e12 for side in flops}
    note = f"{flops['focaldet'] / 1e9:.1f} GFLOP/step"
    note += " on both sides" if flops["focaldet"] == flops["torchvision"] else \
        f" (torchvision {flops['torchvision'] / 1e9:.1f})"
    note += f"; {rates['focaldet']:.3g} / {rates['torchvision']:.3g} TFLOP/s"
    peak = _gpu_peak_tflops(settings)
    if peak:
        note += (f" = {100 * rates['focaldet'] / peak:.1f} % / {100 * rates['torchvision'] / peak:.1f} % "
                 f"of the {settings.amp} peak ({peak:g})")
    return note


def autocast(settings: Settings):
    if settings.amp is None:
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[settings.amp]
    return torch.autocast(torch.device(settings.device).type, dtype=dtype)



def detections_match(a: dict[str, Tensor], b: dict[str, Tensor], score_atol: float = 1e-4,
                      box_atol: float = 1e-3) -> float:
    """Fraction of the detections of ``a`` and ``b`` that have a counterpart on the other side
    (same label, score within ``score_atol``, box within ``box_atol`` px): 1.0 when both
    hold the same detections, whatever the order of equal scores."""
    if len(a["scores"]) == 0 or len(b["scores"]) == 0:
        return float(len(a["scores"]) == len(b["scores"]))
    close = ((a["scores"][:, None] - b["scores"][None]).abs() <= score_atol) \
        & (a["labels"][:, None] == b["labels"][None]) \
        & ((a["boxes"][:, None] - b["boxes"][None]).abs().amax(dim=-1) <= box_atol)  # (Na, Nb)
    matched = int(close.any(dim=1).sum()) + int(close.any(dim=0).sum())
    return matched / (len(a["scores"]) + len(b["scores"]))


def match_note(fd_dets: list[dict[str, Tensor]], tv_dets: list[dict[str, Tensor]]) -> str:
    total = sum(len(d["scores"]) for d in fd_dets)
    fraction = min(detections_match(a, b) for a, b in zip(fd_dets, tv_dets))
    if fraction == 1.0:
        return f"{total} detections, the same as torchvision's"
    return f"{total} detections; worst image: {100 * fraction:.1f}% match torchvision's"



# --------------------------------------------------------------------------- report
def format_table(results: dict[str, dict[str, float]], notes: dict[str, str] | None = None,
                 units: Mapping[str, str] | None = None) -> str:
    """Medians per case and the ratio (> 1: focaldet better)."""
    lines = [f"{'case':<12} {'unit':<6} {'focaldet':>12} {'torchvision':>12} {'ratio':>7}  note",
             "-" * 78]
    for case, r in results.items():
        unit = (units or {}).get(case, "")
        scale = 1 / 2**20 if unit == "MiB" else 1.0
        fmt = "{:>12.1f}" if unit in ("MiB", "img/s") else "{:>12.4f}"
        note = (notes or {}).get(case, "")
        lines.append(f"{case:<12} {unit:<6} " + fmt.format(r["focaldet"] * scale) + " "
                     + fmt.format(r["torchvision"] * scale) + f" {r['ratio']:>6.2f}x  {note}")
    lines.append("ratio: torchvision/focaldet for times and memory, pipeline/decode-only for data; "
                 "> 1 favours focaldet")
    return "\n".join(lines)


def run_cases(cases: Mapping[str, Case], names: Sequence[str], settings: Settings) -> dict[str, dict[str, float]]:
    """Run ``cases[name]`` for each of ``names`` in turn: ``{name: its result}``."""
    results = {}
    for case in names:
        log(settings, f"=== {case}")
        start = time.perf_counter()
        results[case] = cases[case].run(settings)
        r = results[case]
        log(settings, f"{case}: focaldet {r['focaldet']:.4g}  torchvision {r['torchvision']:.4g}  "
                       f"ratio {r['ratio']:.2f}x  ({time.perf_counter() - start:.0f}s)")
    return results


def write_json(results: dict[str, dict[str, float]], path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(results, indent=2) + "\n")


def _warn_if_busy(settings: Settings) -> None:
    """Timings mean little while other processes compete for the cores: with OpenMP every
    parallel region then waits for a descheduled thread (measured here: 10x-100x slower)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return
    cpus = os.cpu_count() or 1
    if load > 0.5 * cpus:
        print(f"[bench] WARNING: load average {load:.1f} on {cpus} CPUs before starting: other processes "
              "compete for the cores and the timings will be unreliable", file=sys.stderr, flush=True)

