"""COCO mAP of an exported model: the val images as the data pipeline reads them (decoded as
small as the eval resize allows, `focaldet.data.transforms.decode_reduction`; the resize itself
is in the graph), the exported file run on each (onnxruntime for ``.onnx``), boxes mapped to
the original pixels, COCOeval of the results -- the number to set beside ``focaldet validate``'s."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import torch

from focaldet.data import CocoDetection
from focaldet.errors import DataError
from focaldet.evaluation import evaluate_coco
from focaldet.evaluation.coco import DEFAULT_BACKEND, CocoEvalResult, detections_to_coco
from focaldet.export.runtime import ExportedDetector
from focaldet.structures.boxes import rescale_boxes


def exported_results(detector: ExportedDetector, dataset: CocoDetection, progress: bool = False) -> list[dict[str, Any]]:
    """COCO results entries of ``detector`` on every image of ``dataset`` (one image per call)."""
    label_of = {c: i for i, c in enumerate(detector.category_ids)}
    if dataset.label_map.cat_ids != sorted(label_of):
        raise DataError(f"{dataset.ann_file}: category ids {dataset.label_map.cat_ids} differ from the exported "
                        f"model's {detector.category_ids} ({detector.path})")
    results, start = [], time.perf_counter()
    for i in range(len(dataset)):
        sample = dataset[i]
        image = sample["image"]  # (3, h, w) uint8, decoded at 1/reduce of the original size
        det = detector(image[None].float() / 255)[0]  # (1, 3, h, w) in [0, 1]
        det["boxes"] = rescale_boxes(det["boxes"], image.shape[-2:], sample["orig_size"])  # original pixels
        labels = torch.tensor([label_of[int(c)] for c in det["category_ids"]], dtype=torch.int64)
        results += detections_to_coco([sample["image_id"]], [{**det, "labels": labels}], detector.category_ids)
        if progress and (i + 1) % 20 == 0:
            print(f"[evaluate] {i + 1}/{len(dataset)} images, {(i + 1) / (time.perf_counter() - start):.1f} img/s",
                  file=sys.stderr, flush=True)
    return results


def evaluate_exported(path: str | os.PathLike, ann_file: str | os.PathLike, image_dir: str | os.PathLike,
                      backend: str = DEFAULT_BACKEND, threads: int = 0, progress: bool = False,
                      trust_code: bool = False) -> CocoEvalResult:
    """COCOeval (bbox) of the exported model at ``path`` on the COCO set ``ann_file`` / ``image_dir``."""
    detector = ExportedDetector(path, threads=threads, trust_code=trust_code)
    dataset = CocoDetection(ann_file, image_dir, resize_after=detector.eval_size)
    results = exported_results(detector, dataset, progress)
    return evaluate_coco(dataset.coco, results, backend=backend, class_names=detector.names,
                         image_ids=dataset.image_ids)
