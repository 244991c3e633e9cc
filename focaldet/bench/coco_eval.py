"""Case ``eval``: COCO evaluation with faster-coco-eval against pycocotools."""

from __future__ import annotations

import contextlib
from typing import Any

from focaldet.bench.harness import Case, Settings, log, compare


def synthetic_coco_eval_data(num_images: int, dets_per_image: int, seed: int, num_classes: int = 80):
    """``(gt dataset dict, results list)``: 2-12 gt boxes per image; detections are jittered
    copies of the gt (true positives of varying quality) plus random boxes, with scores."""
    import numpy as np

    rng = np.random.default_rng(seed)
    images, anns, results = [], [], []
    cats = [{"id": c + 1, "name": f"class{c}"} for c in range(num_classes)]
    for image_id in range(1, num_images + 1):
        w, h = 640, 480
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": w, "height": h})
        g = int(rng.integers(2, 13))
        bw = rng.uniform(8, 200, g)
        bh = rng.uniform(8, 200, g)
        x = rng.uniform(0, w - bw)
        y = rng.uniform(0, h - bh)
        c = rng.integers(1, num_classes + 1, g)
        for j in range(g):
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(c[j]), "iscrowd": 0,
                         "bbox": [float(x[j]), float(y[j]), float(bw[j]), float(bh[j])],
                         "area": float(bw[j] * bh[j])})
        for j in range(dets_per_image):
            if j < 2 * g:  # jittered gt, right or wrong class
                k = j % g
                jit = rng.normal(0, 0.1, 4) * [bw[k], bh[k], bw[k], bh[k]]
                box = [x[k] + jit[0], y[k] + jit[1], max(bw[k] + jit[2], 1.0), max(bh[k] + jit[3], 1.0)]
                cat = int(c[k]) if rng.random() < 0.8 else int(rng.integers(1, num_classes + 1))
                score = float(rng.uniform(0.3, 1.0))
            else:
                bwr, bhr = rng.uniform(8, 200, 2)
                box = [rng.uniform(0, w - bwr), rng.uniform(0, h - bhr), bwr, bhr]
                cat = int(rng.integers(1, num_classes + 1))
                score = float(rng.uniform(0.0, 0.5))
            results.append({"image_id": image_id, "category_id": cat, "bbox": [float(v) for v in box],
                            "score": round(score, 5)})
    return {"images": images, "annotations": anns, "categories": cats}, results


def case_eval(settings: Settings) -> dict[str, float]:
    """``evaluate_coco`` plus the F1 thresholds of the same detections with faster-coco-eval
    (focaldet column) and pycocotools (torchvision column: what torchvision's reference
    scripts use). Both sides compute what ``validate`` takes from the matching: the 12
    numbers, per-class AP, the per-detection IoU-0.5 matching and the thresholds from it
    (the confusion matrix and TIDE terms do not depend on the backend); the 12 numbers and
    the thresholds are checked equal."""
    from faster_coco_eval import COCO as FasterCOCO
    from pycocotools.coco import COCO

    from focaldet.evaluation import evaluate_coco, f1_thresholds

    dataset, results = synthetic_coco_eval_data(settings.eval_images, settings.eval_dets, settings.seed + 7)
    log(settings, f"eval: {settings.eval_images} images x {settings.eval_dets} detections "
                   f"({len(dataset['annotations'])} gt boxes)")
    gts = {}
    for backend, coco_cls in (("faster_coco_eval", FasterCOCO), ("pycocotools", COCO)):
        with contextlib.redirect_stdout(None):  # ground truth indexed once, as in training
            gts[backend] = coco_cls()
            gts[backend].dataset = dataset
            gts[backend].createIndex()
    out: dict[str, Any] = {}

    def run(backend):
        out[backend] = evaluate_coco(gts[backend], results, backend=backend)
        out[backend].thresholds = f1_thresholds(out[backend].matches, out[backend].class_names)

    timing = compare("eval", lambda: run("faster_coco_eval"), lambda: run("pycocotools"), settings)
    a, b = out["faster_coco_eval"].stats, out["pycocotools"].stats
    diff = max(abs(a[k] - b[k]) for k in a)
    settings.notes["eval"] = f"12 stats max |diff| = {diff:.2e} (mAP {b['mAP']:.4f})"
    if diff > 1e-4:
        raise AssertionError(f"faster-coco-eval and pycocotools disagree: max |diff| {diff:.2e}\n{a}\n{b}")
    if out["faster_coco_eval"].thresholds != out["pycocotools"].thresholds:
        raise AssertionError("faster-coco-eval and pycocotools give different F1 thresholds")
    settings.notes["eval"] += ", F1 thresholds equal"
    return timing


CASE = Case(case_eval, unit="s", target=3.0)
