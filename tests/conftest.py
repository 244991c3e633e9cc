"""Shared pytest fixtures: tiny datasets written to temporary folders."""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning (libgomp's default spins for a while after each
# parallel region): on CI's 2 cores a spinning thread of the test process takes the CPU from the
# processes beside it (background jobs, DDP ranks, servers). Read when torch loads libgomp, so
# set before any import of torch; forked processes inherit it. Measured: the suite 330 s -> 305 s.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from focaldet.data.synth import SyntheticCoco, write_synthetic_coco

from background import JOBS, Jobs

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

    if not (torch.cuda.is_available() or os.environ.get(GPU_TESTS_DEVICE_ENV)):
        skip = pytest.mark.skip(reason=f"needs CUDA (or {GPU_TESTS_DEVICE_ENV}=cpu for a dry run)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    _order_around_the_background(items)


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
# The tests that need a trained model or an exported file share these: one `focaldet fit`, one
# `focaldet export` per format and one MobileNetV3 ONNX file for the whole session, built in a
# process of their own while the other tests run (tests/background.py, docs/testing.md).
def _jobs_used(item) -> list[str]:
    """The background jobs a test uses (none when it is skipped: `gpu` tests without CUDA)."""
    if item.get_closest_marker("skip") is not None:
        return []
    return [f for f in getattr(item, "fixturenames", ()) if f in JOBS]


def _module_order(items) -> dict[str, tuple[int, bool]]:
    """Per test module: the position in `JOBS` of the last background job its tests use (-1:
    none), and whether any of its tests is marked slow."""
    order = list(JOBS)
    keys: dict[str, tuple[int, bool]] = {}
    for item in items:
        rank, slow = keys.get(item.module.__name__, (-1, False))
        used = [order.index(f) for f in _jobs_used(item)]
        keys[item.module.__name__] = (max([rank, *used]), slow or item.get_closest_marker("slow") is not None)
    return keys


def _order_around_the_background(items) -> None:
    """Modules of fast tests first (they run beside the background jobs, which take a core for
    a minute or two), then those with slow tests, then those that use a background job, in
    `JOBS` order; a module's tests stay together (its module-scoped fixtures are built once)."""
    keys = _module_order(items)
    if any(rank >= 0 for rank, _ in keys.values()):  # else (make test-fast) the files' order
        items.sort(key=lambda item: keys[item.module.__name__])  # stable


@pytest.fixture(autouse=True, scope="session")
def background(request, tmp_path_factory, _image_scan_cache) -> Jobs:
    """The session's `Jobs`, started at the first test with the jobs the selected tests use."""
    needed = {f for item in request.session.items for f in _jobs_used(item)}
    jobs = Jobs(tmp_path_factory.mktemp("background"), request.getfixturevalue("synth_coco") if needed else None)
    jobs.start(needed, TEST_THREADS)
    yield jobs
    jobs.stop()


def _paths(result: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: Path(v) if k in keys else v for k, v in result.items()}


@pytest.fixture(scope="session")
def tiny_run(background: Jobs) -> dict[str, Path]:
    """``focaldet fit`` of the tiny config for 40 AdamW steps at 96-128 px (batches of 3),
    keeping detections down to score 0.02 (`artifacts.fit_tiny_run`): ``{"cfg", "ckpt"
    (last.ckpt), "root"}``. Read-only."""
    return _paths(background.result("tiny_run"), "cfg", "ckpt", "root")


@pytest.fixture(scope="session")
def tiny_pt2(background: Jobs) -> dict[str, Any]:
    """`tiny_run`'s checkpoint through ``focaldet export --format torch_export``: ``{"path",
    "stdout", "status"}``. Read-only."""
    return _paths(background.result("tiny_pt2"), "path")


@pytest.fixture(scope="session")
def tiny_onnx(background: Jobs) -> dict[str, Any]:
    """`tiny_run`'s checkpoint through ``focaldet export --format onnx``: ``{"path", "stdout",
    "status"}``. Read-only."""
    return _paths(background.result("tiny_onnx"), "path")


@pytest.fixture(scope="session")
def tiny_pt2_detector(tiny_pt2: dict[str, Any]):
    """`tiny_pt2` loaded (`ExportedDetector`), once for the session."""
    from focaldet.export.runtime import ExportedDetector

    return ExportedDetector(tiny_pt2["path"])


@pytest.fixture(scope="session")
def mobilenet_onnx(background: Jobs) -> Path:
    """`artifacts.mobilenet_detector` exported to ONNX (category ids 1, 2, 3). Read-only."""
    return Path(background.result("mobilenet_onnx")["path"])


def _job_result(name: str, doc: str):
    """A session fixture returning background job ``name``'s result (its builder: `JOBS[name]`)."""

    def fixture(background: Jobs) -> dict[str, Any]:
        return background.result(name)

    fixture.__doc__ = f"{doc} (`{JOBS[name][0]}`)."
    return pytest.fixture(scope="session", name=name)(fixture)


# the tests that read these assert on what the builder returns: what commands printed, the files
# they wrote, the metrics they logged
walkthrough = _job_result("walkthrough", "docs/own-data.md's walkthrough commands run as written")
bench_quick = _job_result("bench_quick", "``focaldet bench --quick`` of every case but the exports")
doors = _job_result("doors", "`tiny_run`'s detections through every door")
ema_run = _job_result("ema_run", "an EMA fit and two validates of its best checkpoint")
cli_run = _job_result("cli_run", "fit, validate, test and predict of the tiny config")
evaluator_run = _job_result("evaluator_run", "fit, validate, and predict at its thresholds")
compiled_focal_loss = _job_result("compiled_focal_loss", "the focal loss, eager and compiled: values and gradients")
ddp_failures = _job_result("ddp_failures", "two DDP fits, one rank of each failing: exit codes and stderr")
equal_budget = _job_result("equal_budget", "``focaldet equal-budget`` of the tiny config: its exit code and folder")
