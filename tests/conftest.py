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


# Tiny models trained for a few steps put many scores near the thresholds the tests compare at,
# and oneDNN's results depend on how many threads split a convolution: the test process computes
# with CI's 2 threads whatever the machine (measured here: 1 thread swaps two tied detections of
# the torchvision parity test).
TEST_THREADS = 2


def pytest_configure(config):
    import torch

    # Lightning's loggers get a StreamHandler of the sys.stderr of their first import: here, the
    # session's, not the capsys stream of whichever test imports it first (closed after that test)
    import lightning.pytorch  # noqa: F401

    torch.set_num_threads(TEST_THREADS)


def pytest_collection_modifyitems(config, items):
    import os

    import torch

    if torch.cuda.is_available() or os.environ.get(GPU_TESTS_DEVICE_ENV):
        return
    skip = pytest.mark.skip(reason=f"needs CUDA (or {GPU_TESTS_DEVICE_ENV}=cpu for a dry run)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_collection_finish(session):
    """Processes of their own (`warm`) fork from a server that imports torch, Lightning and
    focaldet once: started here, when slow tests will run, it imports while the first tests run."""
    if any(item.get_closest_marker("slow") for item in session.items):
        from warm import start_server

        start_server()


@pytest.fixture(autouse=True, scope="session")
def _image_scan_cache(tmp_path_factory: pytest.TempPathFactory):
    """Image scans are cached in a temporary folder, not in the user's ~/.cache (inherited by
    subprocesses)."""
    import os

    previous = os.environ.get("FOCALDET_CACHE")
    os.environ["FOCALDET_CACHE"] = str(tmp_path_factory.mktemp("focaldet_cache"))
    yield
    if previous is None:
        os.environ.pop("FOCALDET_CACHE", None)
    else:
        os.environ["FOCALDET_CACHE"] = previous


# ----------------------------------------------------------------------------- one trained run, one export
# The tests that need a trained model or an exported file share these: one `focaldet fit` and
# one `focaldet export` per format for the whole session (docs/testing.md).
TINY_LOW_THRESH = {"class_path": "focaldet.models.PostProcess",
                   "init_args": {"score_thresh": 0.02, "detections_per_img": 30}}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, synth_coco: SyntheticCoco) -> dict[str, Path]:
    """``focaldet fit`` of the tiny config for 40 AdamW steps at 96-128 px (batches of 3),
    keeping detections down to score 0.02: ``{"cfg", "ckpt" (last.ckpt), "root"}``. Read-only."""
    from focaldet.cli import main

    from helpers import ckpt_dir, tiny_config

    root = tmp_path_factory.mktemp("tiny_run")
    cfg = tiny_config(root, synth_coco, **{"trainer.max_steps": 40, "trainer.val_check_interval": 40,
                                           "model.optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.001}},
                                           "model.base_batch_size": 2, "model.lr_scheduler.init_args.warmup_iters": 5,
                                           "model.model.postprocess": TINY_LOW_THRESH,
                                           "data.min_size": 96, "data.max_size": 128, "data.batch_size": 3})
    assert main(["fit", "-c", str(cfg)]) == 0
    return {"cfg": cfg, "ckpt": ckpt_dir(root / "run") / "last.ckpt", "root": root}


def _export_tiny_run(tiny_run: dict[str, Path], fmt: str, out: Path) -> dict[str, Any]:
    """``focaldet export --ckpt_path <tiny_run> --format FMT --output OUT``: ``{"path", "stdout", "status"}``."""
    import contextlib
    import io

    from focaldet.export.cli import main as export_main

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = export_main(["--ckpt_path", str(tiny_run["ckpt"]), "--format", fmt, "--output", str(out)])
    return {"path": out, "stdout": stdout.getvalue(), "status": status}


@pytest.fixture(scope="session")
def tiny_pt2(tmp_path_factory: pytest.TempPathFactory, tiny_run: dict[str, Path]) -> dict[str, Any]:
    """`tiny_run`'s checkpoint through ``focaldet export --format torch_export``. Read-only."""
    return _export_tiny_run(tiny_run, "torch_export", tmp_path_factory.mktemp("tiny_pt2") / "model.pt2")


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory, tiny_run: dict[str, Path]) -> dict[str, Any]:
    """`tiny_run`'s checkpoint through ``focaldet export --format onnx``. Read-only."""
    return _export_tiny_run(tiny_run, "onnx", tmp_path_factory.mktemp("tiny_onnx") / "model.onnx")


@pytest.fixture(scope="session")
def tiny_pt2_detector(tiny_pt2: dict[str, Any]):
    """`tiny_pt2` loaded (`ExportedDetector`), once for the session."""
    from focaldet.export.runtime import ExportedDetector

    return ExportedDetector(tiny_pt2["path"])
