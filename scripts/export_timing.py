"""Time writing and loading an exported detector (ONNX and .pt2), randomly initialised, no download.

    python scripts/export_timing.py --depth 50 --out /tmp/export_timing

docs/deploy.md quotes its ResNet-50 numbers (800/1333 px, 80 classes, 2 CPU cores).
"""
from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=50, help="ResNet depth (18, 34, 50, 101)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/export_timing"), help="folder for the files")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    from focaldet.export.core import export_onnx, export_torch
    from focaldet.export.runtime import ExportedDetector
    from focaldet.models import ResNetBackbone, RetinaNet

    torch.manual_seed(0)
    model = RetinaNet(80, backbone=ResNetBackbone(depth=args.depth, norm="frozen_bn"), min_size=800, max_size=1333).eval()
    ids, names = list(range(1, 81)), [str(i) for i in range(80)]
    args.out.mkdir(parents=True, exist_ok=True)
    for fmt, write in (("onnx", export_onnx), ("pt2", export_torch)):
        path = args.out / f"r{args.depth}.{fmt}"
        t = time.perf_counter()
        write(model, ids, names, path)
        written = time.perf_counter() - t
        t = time.perf_counter()
        ExportedDetector(path)
        print(f"R-{args.depth} {fmt}: write {written:.1f} s, load {time.perf_counter() - t:.1f} s", flush=True)


if __name__ == "__main__":
    main()
