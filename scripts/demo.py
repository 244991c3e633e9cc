"""`make demo`: generate the synthetic dataset, train configs/synth.yaml on it, evaluate the
best checkpoint (COCO table + per-class AP), and write PNGs of val detections and PR curves.

Everything is local, nothing is downloaded. About 8-10 minutes on a 2-core CPU.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path("data/synth")
RUN = Path("runs/synth")
CONFIG = "configs/synth.yaml"


def main() -> int:
    from focaldet.cli import main as focaldet

    os.chdir(REPO)
    start = time.time()
    if not (DATA / "annotations" / "instances_val.json").is_file():
        print("== 1/3 writing the synthetic dataset to data/synth", flush=True)
        focaldet(["data", "synth", "--out", str(DATA)])
    focaldet(["data", "check", str(DATA / "annotations/instances_train.json"), "--images", str(DATA / "images"),
              "-c", CONFIG])

    print("\n== 2/3 training configs/synth.yaml: ResNet-18 FPN RetinaNet from scratch on the CPU", flush=True)
    focaldet(["fit", "-c", CONFIG])  # a run of its own: runs/synth/lightning_logs/version_N/

    from focaldet.engine.checkpoints import run_checkpoint_dirs

    best = max(run_checkpoint_dirs(RUN)[0].glob("best-*.ckpt"), key=lambda p: float(p.stem.rsplit("-", 1)[1]))
    print(f"\n== 3/3 evaluating {best} on the val split", flush=True)
    focaldet(["validate", "-c", CONFIG, "--ckpt_path", str(best)])
    print(f"demo finished in {time.time() - start:.0f} s; pictures are in the run folder printed above", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
