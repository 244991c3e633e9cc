"""``focaldet bench``: focaldet against torchvision's RetinaNet, side by side in one run.

Both sides run the same architecture with the same weights and settings (the focaldet
model is built with ``RetinaNet.from_torchvision``), on the same device and the same
inputs. Every timed case warms up both sides, then alternates them (focaldet, torchvision,
torchvision, focaldet, ...) so that drifting machine load hits both alike, synchronises
CUDA around every call, and reports medians. The ratio is always "higher is better for
focaldet": torchvision time / focaldet time, torchvision bytes / focaldet bytes, and for
images/s focaldet / the decode-only limit.

Cases::

    train_step   forward + loss + backward of a batch (both with frozen BatchNorm)
    loss         target assignment + both losses + backward, from given head outputs
    loss_vfl     the same with VarifocalLoss (IoU targets of decoded boxes) as the class loss
    loss_scaling the loss case at 10, 100, 500 and 2000 boxes per image (crowded scenes)
    postprocess  decode + top-k + NMS, from given head outputs
    inference    images -> detections, eval mode
    data         training data pipeline images/s against decoding the JPEGs alone
    eval         COCO evaluation: faster-coco-eval (focaldet column) vs pycocotools
    memory       peak memory of one training step (CUDA: max_memory_allocated; CPU: peak
                 RSS growth in a process of its own per side)
    export       the ONNX file through onnxruntime (focaldet column) vs focaldet's PyTorch
                 predict (torchvision column), CPU
    export_int8  the same for the int8 ONNX file (--quantize int8), CPU
    export_openvino  the same for the OpenVINO IR file (--format openvino), CPU

Usage: ``focaldet bench [--cases loss,postprocess] [--quick] [--json FILE] [--device cuda]``.
Adding a case: a module here defining ``CASE = Case(run, unit, target)`` (see harness.Case),
and its line in ``CASES`` below.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from focaldet.bench import coco_eval, data, export, inference, loss, loss_scaling, memory, postprocess, train_step
from focaldet.bench import harness, plot
from focaldet.bench.harness import Case, Settings, log, _warn_if_busy, write_json

__all__ = ["CASES", "Case", "Settings", "main", "run_cases"]

# The cases, in the order they run; the names are what --cases takes.
CASES: dict[str, Case] = {
    "train_step": train_step.CASE,
    "loss": loss.CASE,
    "loss_vfl": loss.CASE_VFL,
    "loss_scaling": loss_scaling.CASE,
    "postprocess": postprocess.CASE,
    "inference": inference.CASE,
    "data": data.CASE,
    "eval": coco_eval.CASE,
    "memory": memory.CASE,
    "export": export.CASE,
    "export_int8": export.CASE_INT8,
    "export_openvino": export.CASE_OPENVINO,
}

UNITS = {name: case.unit for name, case in CASES.items()}
# The ratios focaldet aims at (docs/benchmarks.md "Targets"), on CPU and on a GPU.
TARGETS = {name: case.target for name, case in CASES.items()}
GPU_TARGETS = {name: case.gpu_target or case.target for name, case in CASES.items()}


def run_cases(names: Sequence[str], settings: Settings) -> dict[str, dict[str, float]]:
    return harness.run_cases(CASES, names, settings)


def format_table(results: dict[str, dict[str, float]], notes: dict[str, str] | None = None) -> str:
    return harness.format_table(results, notes, UNITS)


def plot_ratios(results: dict[str, dict[str, float]], path: str | os.PathLike, title: str = "",
                device: str = "cpu") -> Path:
    """The ratios as a bar chart against the targets on ``device`` ("cpu" or "cuda")."""
    return plot.plot_ratios(results, path, TARGETS if device == "cpu" else GPU_TARGETS, title)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="focaldet bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--quick", action="store_true", help="tiny sizes and 2 repeats (a smoke run)")
    p.add_argument("--json", metavar="FILE", help="write {case: {focaldet, torchvision, ratio}} to FILE")
    p.add_argument("--plot", metavar="FILE", help="write a bar chart of the ratios and targets to FILE (PNG)")
    p.add_argument("--device", default=None, help="cpu | cuda[:i] (default: cuda when available)")
    p.add_argument("--size", type=int, help="image side for train_step/inference/memory (default 320)")
    p.add_argument("--batch", type=int, help="batch for train_step/inference/memory (default 2)")
    p.add_argument("--loss-size", type=int, help="image side for loss/postprocess (default 512)")
    p.add_argument("--loss-batch", type=int, help="batch for loss/postprocess (default 8)")
    p.add_argument("--num-classes", type=int, help="classes (default 80)")
    p.add_argument("--amp", choices=("bf16", "fp16"), help="autocast dtype for train_step/inference/memory")
    p.add_argument("--compile", action="store_true", help="focaldet's focal loss through torch.compile")
    p.add_argument("--channels-first", action="store_true",
                   help="focaldet's model in NCHW, as --model.model.channels_last false (default: NHWC)")
    p.add_argument("--keep-bn", action="store_true",
                   help="inference: keep focaldet's frozen BN (default: folded into the convolutions)")
    p.add_argument("--repeats", type=int, help="timed calls per side (default 5; 2 with --quick)")
    p.add_argument("--warmup", type=int, help="untimed calls per side first (default 1)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--workers", type=int, help="data loader workers for the data case (default 2)")
    p.add_argument("--data-dir", type=Path, help="COCO-layout dataset for the data case (default: shared/data/bccd beside the checkout)")
    p.add_argument("--eval-images", type=int, help="images of the eval case (default 2000)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = (Settings.quick if args.quick else Settings)(device=device, amp=args.amp, compile=args.compile,
                                                          channels_last=not args.channels_first,
                                                          fuse_bn=not args.keep_bn, verbose=not args.quiet)
    for name in ("size", "batch", "loss_size", "loss_batch", "num_classes", "repeats", "warmup", "workers",
                 "data_dir", "eval_images"):
        value = getattr(args, name)
        if value is not None:
            setattr(settings, name, value)
    settings.threads = args.threads or 0
    return settings


def main(argv: list[str] | None = None) -> int:
    """``focaldet bench``; returns the exit status."""
    args = _parser().parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        print(f"focaldet bench: unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}", file=sys.stderr)
        return 2
    settings = settings_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        print("focaldet bench: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    log(settings, f"device {settings.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
                   f"amp {settings.amp}, compile {settings.compile}, channels_last {settings.channels_last}, "
                   f"fuse_bn {settings.fuse_bn}, "
                   f"repeats {settings.repeats}")
    _warn_if_busy(settings)
    results = run_cases(cases, settings)
    print(format_table(results, settings.notes))
    if args.json:
        write_json(results, args.json)
    if args.plot:
        title = f"focaldet vs torchvision RetinaNet ({settings.device}, torch {torch.__version__})"
        log(settings, f"wrote {plot_ratios(results, args.plot, title, settings.device.split(':')[0])}")
    return 0
