"""Shared pytest fixtures: tiny datasets written to temporary folders."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from focaldet.data.synth import SyntheticCoco, write_synthetic_coco

# shared/ sits beside the repository (here and in CI).
BCCD_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "bccd"


@pytest.fixture(scope="session")
def synth_coco(tmp_path_factory: pytest.TempPathFactory) -> SyntheticCoco:
    """Tiny synthetic shapes dataset (seed 0): 16 images of 128x128 px, 12 train + 4 val,
    4 classes with category ids 1, 3, 7, 8. Read-only: tests must not modify it."""
    root = tmp_path_factory.mktemp("synth_coco")
    return write_synthetic_coco(root, num_images=16, seed=0, num_classes=4, image_size=128, val_fraction=0.25)


@pytest.fixture(scope="session")
def bccd_dir() -> Path:
    """``<repo>/../shared/data/bccd`` (real 640x480 blood-cell photos, 3 classes); skips when absent."""
    if not (BCCD_DIR / "annotations" / "instances_train.json").is_file():
        pytest.skip(f"BCCD dataset not found at {BCCD_DIR}")
    return BCCD_DIR


@pytest.fixture
def make_coco(tmp_path: Path) -> Callable[..., tuple[Path, Path]]:
    """Factory writing a hand-made COCO dataset into ``tmp_path``; returns ``(ann_file, image_dir)``.

    ``make_coco(images=[(w, h), ...], annotations=[{"image_id", "category_id", "bbox", ...}],
    categories=[{"id", "name"}], seed=0)``: image ids are 1..N with files ``img_<id>.jpg``
    (random noise); annotation ids default to 1..M; missing ``iscrowd``/``area`` are filled in.
    """

    def make(
        images: Sequence[tuple[int, int]] = ((64, 48),),
        annotations: Sequence[dict[str, Any]] = (),
        categories: Sequence[dict[str, Any]] = ({"id": 1, "name": "thing"},),
        seed: int = 0,
        name: str = "instances.json",
    ) -> tuple[Path, Path]:
        rng = np.random.default_rng(seed)
        image_dir = tmp_path / "images"
        image_dir.mkdir(exist_ok=True)
        entries = []
        for image_id, (w, h) in enumerate(images, start=1):
            file_name = f"img_{image_id}.jpg"
            pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            cv2.imwrite(str(image_dir / file_name), pixels)
            entries.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
        anns = []
        for ann_id, ann in enumerate(annotations, start=1):
            ann = {"id": ann_id, "iscrowd": 0, **ann}
            bbox = ann.get("bbox")
            if isinstance(bbox, list) and len(bbox) == 4:
                ann.setdefault("area", float(bbox[2] * bbox[3]))
            anns.append(ann)
        ann_file = tmp_path / name
        ann_file.write_text(json.dumps({"images": entries, "annotations": anns, "categories": list(categories)}))
        return ann_file, image_dir

    return make


# `gpu` tests run where CUDA is; FOCALDET_GPU_TESTS_DEVICE=cpu runs them on CPU instead (a dry
# run of their logic, as `scripts/gpu_check.sh --cpu` does); elsewhere they are skipped.
GPU_TESTS_DEVICE_ENV = "FOCALDET_GPU_TESTS_DEVICE"


def pytest_collection_modifyitems(config, items):
    import os

    import torch

    if torch.cuda.is_available() or os.environ.get(GPU_TESTS_DEVICE_ENV):
        return
    skip = pytest.mark.skip(reason=f"needs CUDA (or {GPU_TESTS_DEVICE_ENV}=cpu for a dry run)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
