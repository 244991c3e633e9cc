"""What sliced inference buys on small objects in large images (AP_small with and without).

    python scripts/slicing_gain.py --ckpt CKPT [--out /tmp/slicing_gain] [--grid 4] [--images 20]

The model of ``CKPT`` was trained on the synthetic shapes at its eval size (e.g.
``configs/study_synth.yaml``: 128 px images, objects 8-41 px). The test set is made of
mosaics: ``--grid`` x ``--grid`` fresh synthetic images of that size (``focaldet data synth``
with another seed) side by side, so each mosaic is ``grid * size`` px with the same small
objects. Three ways to run the model on it, evaluated with COCOeval (areas in mosaic pixels):

- ``whole image``: the mosaic resized to the checkpoint's eval size (what ``predict`` does
  without slicing: a model deployed at a fixed input size sees the objects ``grid`` x smaller);
- ``sliced``: windows of the eval size, 20 % overlap, plus the full-image pass, merged with
  class-aware NMS (``focaldet.inference.Slicing``);
- ``whole image, native``: the mosaic at its own resolution in one pass (the upper reference
  when the model and memory allow it: a fully convolutional model sees the objects at their
  training scale).

``detections_per_img`` is raised to 100 per tile for all three, and COCOeval's maxDets with
it, so the cap does not decide the comparison. A study, not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import cv2
import numpy as np

import focaldet
from focaldet.data.synth import write_synthetic_coco
from focaldet.evaluation.coco import detections_to_coco, evaluate_coco


def write_mosaics(tiles_dir: Path, out: Path, grid: int) -> Path:
    """``grid x grid`` mosaics of the val images of a synthetic set; returns the JSON path."""
    ann = json.loads((tiles_dir / "annotations" / "instances_val.json").read_text())
    boxes_of: dict[int, list[dict]] = {}
    for a in ann["annotations"]:
        boxes_of.setdefault(a["image_id"], []).append(a)
    per = grid * grid
    tiles = ann["images"][: len(ann["images"]) // per * per]
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for m in range(len(tiles) // per):
        group = tiles[m * per:(m + 1) * per]
        h, w = group[0]["height"], group[0]["width"]
        canvas = np.zeros((grid * h, grid * w, 3), np.uint8)
        for k, tile in enumerate(group):
            oy, ox = (k // grid) * h, (k % grid) * w
            canvas[oy:oy + h, ox:ox + w] = cv2.imread(str(tiles_dir / "images" / tile["file_name"]))
            for a in boxes_of.get(tile["id"], []):
                x, y, bw, bh = a["bbox"]
                annotations.append({**a, "id": len(annotations) + 1, "image_id": m + 1, "bbox": [x + ox, y + oy, bw, bh]})
        name = f"mosaic_{m + 1:04d}.png"
        cv2.imwrite(str(out / "images" / name), canvas)
        images.append({"id": m + 1, "file_name": name, "height": grid * h, "width": grid * w})
    path = out / "mosaics.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": ann["categories"]}))
    return path


def evaluate(det, gt: Path, image_dir: Path, max_dets: int, **predict) -> tuple[dict, float]:
    images = json.loads(gt.read_text())["images"]
    start = time.perf_counter()
    found = det.predict([image_dir / i["file_name"] for i in images], batch_size=2, **predict)
    seconds = time.perf_counter() - start
    label_to_cat = det.category_ids
    results = detections_to_coco([i["id"] for i in images], found, label_to_cat)
    return evaluate_coco(str(gt), results, max_dets=max_dets).stats, seconds / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, type=Path)
    parser.add_argument("--out", type=Path, default=Path("/tmp/slicing_gain"))
    parser.add_argument("--grid", type=int, default=4)
    parser.add_argument("--images", type=int, default=20, help="mosaics to build (default 20)")
    parser.add_argument("--seed", type=int, default=2, help="seed of the synthetic tiles (not the training seed)")
    args = parser.parse_args()

    det = focaldet.load(args.ckpt, device="cpu")
    size = det.inputs.min_size
    per = args.grid * args.grid
    tiles = write_synthetic_coco(args.out / "tiles", num_images=per * args.images + 1, seed=args.seed,
                                 num_classes=len(det.names), image_size=size, val_fraction=1.0)
    gt = write_mosaics(tiles.root, args.out, args.grid)
    max_dets = 100 * per
    det.model.postprocess.detections_per_img = max_dets

    rows = {}
    rows["whole image"] = evaluate(det, gt, args.out / "images", max_dets)
    rows["sliced"] = evaluate(det, gt, args.out / "images", max_dets,
                              slicing={"size": size, "overlap": 0.2, "full_image": True})
    native = dataclasses.replace(det.inputs, min_size=args.grid * size, max_size=args.grid * size)
    det.inputs, det._transforms = native, native.eval_pipeline()
    rows["whole image, native"] = evaluate(det, gt, args.out / "images", max_dets)

    print(f"{args.images} mosaics of {args.grid}x{args.grid} tiles of {size} px ({args.grid * size} px), "
          f"model eval size {size}, maxDets {max_dets}")
    print("| inference | AP | AP50 | AP_small | AP_medium | AR_small | s/image |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (stats, seconds) in rows.items():
        ap, ap50, aps, apm, ars = (100 * stats[k] for k in ("mAP", "AP50", "APs", "APm", "ARs"))
        print(f"| {name} | {ap:.1f} | {ap50:.1f} | {aps:.1f} | {apm:.1f} | {ars:.1f} | {seconds:.2f} |")
    (args.out / "results.json").write_text(json.dumps({k: {"stats": v[0], "seconds_per_image": v[1]}
                                                       for k, v in rows.items()}, indent=1))


if __name__ == "__main__":
    main()
