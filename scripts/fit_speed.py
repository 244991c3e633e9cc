"""Training speed of ``focaldet fit`` on crowded scenes against COCO-like density.

    python scripts/fit_speed.py [--out /tmp/fit_speed] [--steps 25] [--size 512] [--threads 2]

Writes two synthetic sets of the same image size (``focaldet data synth``: 3-8 shapes per
image, and ``--crowded``: 300-1000 at 512 px), trains the tiny model of ``configs/synth.yaml``
(ResNet-18, FPN 64, 2 head convs) for ``--steps`` steps on each with the same settings (batch
2, no validation, no checkpoints), and prints per set the training speed (``TrainingSpeed``:
images/s after 5 warm-up steps), the boxes per image and the share of the step time spent
in ``RetinaNetCriterion.forward`` (assignment + both losses; the fused focal loss writes its
gradient in the forward, so the loss's backward is one scaling pass). A study, not a test.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from focaldet.cli import run
from focaldet.engine.lightning_cli import TrainingSpeed
from focaldet.losses.criterion import RetinaNetCriterion


def _timed_criterion(clock: dict):
    forward = RetinaNetCriterion.forward

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        out = forward(self, *args, **kwargs)
        if self.training and torch.is_grad_enabled():
            clock["loss"] += time.perf_counter() - start
            clock["calls"] += 1
        return out

    return timed


def fit_once(root: Path, data: Path, size: int, steps: int) -> dict:
    clock = {"loss": 0.0, "calls": 0}
    RetinaNetCriterion.forward, original = _timed_criterion(clock), RetinaNetCriterion.forward
    speed = {}
    original_end = TrainingSpeed.on_train_end

    def on_train_end(self, trainer, pl_module):  # keep the figure
        original_end(self, trainer, pl_module)
        speed["images_per_second"], speed["elapsed"] = self.images_per_second, self._elapsed

    TrainingSpeed.on_train_end = on_train_end
    start = time.perf_counter()
    try:
        run(["fit", "--config", "configs/synth.yaml",
             f"--data.train_ann={data}/annotations/instances_train.json", f"--data.train_images={data}/images",
             f"--data.val_ann={data}/annotations/instances_val.json", f"--data.val_images={data}/images",
             f"--data.min_size={size}", f"--data.max_size={size}", "--data.batch_size=2", "--data.num_workers=0",
             f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=0",
             "--trainer.enable_progress_bar=false",
             f"--trainer.default_root_dir={root}/run-{data.name}", "--model.lr_scheduler.milestones=[1000,2000]",
             "--model.lr_scheduler.warmup_iters=1"])
    finally:
        RetinaNetCriterion.forward, TrainingSpeed.on_train_end = original, original_end
    total = time.perf_counter() - start  # setup and data writing included
    ann = json.loads((data / "annotations" / "instances_train.json").read_text())
    return {"images_per_second": speed.get("images_per_second"),
            "boxes_per_image": len(ann["annotations"]) / len(ann["images"]),
            "loss_seconds_per_step": clock["loss"] / max(clock["calls"], 1),
            "loss_share": clock["loss"] / max(clock["calls"], 1) * (speed.get("images_per_second") or 0) / 2,
            "fit_seconds": total}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/fit_speed"))
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for name, extra in (("coco_like", []), ("crowded", ["--crowded"])):
        data = args.out / name
        if not (data / "annotations" / "instances_train.json").is_file():
            run(["data", "synth", "--out", str(data), "--size", str(args.size), "--num-images", str(args.images),
                 *extra])
        results[name] = fit_once(args.out, data, args.size, args.steps)
    print(json.dumps(results, indent=2))
    for name, r in results.items():
        print(f"{name:<10} {r['boxes_per_image']:7.1f} boxes/image  {r['images_per_second']:.2f} images/s  "
              f"loss (assign + losses, forward) {1000 * r['loss_seconds_per_step']:.0f} ms/step = "
              f"{100 * r['loss_share']:.0f} % of a step")


if __name__ == "__main__":
    main()
