"""What crowd regions cost a training step and a dataset item.

    python scripts/crowd_cost.py [--out /tmp/crowd_cost] [--steps 30] [--size 256] [--threads 2]

Writes a small synthetic set (``focaldet data synth``), and a copy of its train JSON with one
``iscrowd`` region per image (the lower right quarter). Trains the model of
``configs/synth.yaml`` (ResNet-18, FPN 64, 2 head convs, AdamW) on the same fixed batches
(batch 4), interleaving steps with the crowd regions and with them removed (``C = 0``), and
prints how many anchors batch 0 ignores with and without them, the median step time (forward, criterion, backward, optimiser step) of each; then the
median time of a dataset item (decode, resize, flip) from either JSON. A study, not a test.
"""

from __future__ import annotations

from functools import partial

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

from focaldet.data import CocoDetection, collate_detection
from focaldet.data.synth import write_synthetic_coco
from focaldet.data.transforms import build_transforms
from focaldet.models import AnchorGenerator, ResNetBackbone, RetinaNet
from focaldet.engine.module import RetinaNetModule


def with_crowd(ann: Path, out: Path) -> Path:
    data = json.loads(ann.read_text())
    next_id = max(a["id"] for a in data["annotations"]) + 1
    for i, img in enumerate(data["images"]):
        w, h = img["width"], img["height"]
        data["annotations"].append({"id": next_id + i, "image_id": img["id"], "category_id": data["categories"][0]["id"],
                                    "bbox": [w / 2, h / 2, w / 2, h / 2], "area": w * h / 4, "iscrowd": 1})
    out.write_text(json.dumps(data))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/crowd_cost"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    warnings.simplefilter("ignore")
    synth = write_synthetic_coco(args.out, num_images=48, seed=0, image_size=args.size, val_fraction=0.0)
    crowd_ann = with_crowd(synth.train_ann, args.out / "instances_train_crowd.json")
    transforms = build_transforms(True, args.size, args.size, seed=0)
    plain_ds = CocoDetection(synth.train_ann, synth.images, transforms=transforms)
    crowd_ds = CocoDetection(crowd_ann, synth.images, transforms=transforms)

    batches = [collate_detection([crowd_ds[i] for i in range(b, b + 4)]) for b in range(0, 40, 4)]
    torch.manual_seed(0)
    model = partial(RetinaNet, backbone=ResNetBackbone(18, norm="bn", freeze_at=0),
                    anchor_generator=AnchorGenerator(sizes=[16, 32, 64, 128, 256]), fpn_channels=64, num_convs=2)
    module = RetinaNetModule(plain_ds.label_map.num_classes, model=model).train()
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    with torch.no_grad():
        b0 = batches[0]
        outputs = module._forward(b0)
        ignored = [(module.criterion.assign(outputs, b0["boxes"], b0["labels"], crowd).weight == 0).sum().item()
                   for crowd in (None, b0["crowd_boxes"])]
    print(f"ignored anchors in batch 0 ({len(outputs['anchors'])} per image, 4 images): "
          f"{ignored[0]} without crowd regions, {ignored[1]} with")

    def step(batch: dict) -> float:
        start = time.perf_counter()
        module._losses(batch)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"without": [], "with": []}
    for i in range(args.steps + 3):  # 3 warm-up rounds
        batch = batches[i % len(batches)]
        for name in ("without", "with") if i % 2 else ("with", "without"):
            b = batch if name == "with" else {**batch, "crowd_boxes": batch["crowd_boxes"][:, :0]}
            t = step(b)
            if i >= 3:
                times[name].append(t)
    for name, ts in times.items():
        print(f"train step {name} crowd regions: {statistics.median(ts) * 1e3:.1f} ms (median of {len(ts)})")

    items: dict[str, list[float]] = {"without": [], "with": []}
    for i in range(len(plain_ds)):
        for name, ds in (("without", plain_ds), ("with", crowd_ds)):
            start = time.perf_counter()
            ds[i]
            items[name].append(time.perf_counter() - start)
    for name, ts in items.items():
        print(f"dataset item {name} crowd regions: {statistics.median(ts) * 1e3:.2f} ms (median of {len(ts)})")


if __name__ == "__main__":
    main()
