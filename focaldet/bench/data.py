"""Case ``data``: the training data pipeline's images/s against decoding the JPEGs alone."""

from __future__ import annotations

import copy
import functools
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from focaldet.bench.harness import BCCD_DIR, Case, Settings, log


class _DecodeOnly(torch.utils.data.Dataset):
    """The decode limit: the pipeline's own decoder (``read_image``: the file's bytes ->
    RGB array, the fastest way OpenCV offers) on each file, nothing else. Only the image's
    shape goes back to the main process (sending the pixels would cost a pickled copy per
    image, more than the pipeline's shared-memory batches cost)."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from focaldet.data import read_image

        return read_image(self.paths[i]).shape


def _list_collate(batch):
    return batch


def _data_source(settings: Settings, tmp: Path) -> tuple[Path, Path, str]:
    """``(train_ann, images_dir, name)``: BCCD when present, else a synthetic set in ``tmp``."""
    root = settings.data_dir if settings.data_dir is not None else BCCD_DIR
    ann = root / "annotations" / "instances_train.json"
    if ann.is_file():
        return ann, root / "images", f"BCCD ({root})"
    from focaldet.data.synth import write_synthetic_coco

    n = max(settings.data_images, 32)
    log(settings, f"data: {ann} not found; writing {n} synthetic 640 px images")
    synth = write_synthetic_coco(tmp, num_images=n, seed=settings.seed, num_classes=4, image_size=640,
                                 val_fraction=0.1)
    return synth.train_ann, synth.images, "synthetic shapes, 640 px"


def _images_per_second(loader, count: Callable[[Any], int]) -> float:
    """Images/s over one whole epoch of ``loader``, whose persistent workers were started by
    the warm-up epoch (a whole epoch, so no prefetched work runs into the other side's)."""
    start = time.perf_counter()
    done = sum(count(batch) for batch in loader)
    return done / (time.perf_counter() - start)


def case_data(settings: Settings) -> dict[str, float]:
    """Training pipeline (CocoDataModule: decode + resize + flip + collate) images/s against
    decoding the same JPEGs alone, same batch size and workers; ratio = pipeline / decode.

    The note adds a third loader, the same dataset without augmentation (decode, pack,
    collate, deliver the batch to this process): the floor of any pipeline that hands the
    pixels over through DataLoader workers, as a share of the decode limit."""
    from torch.utils.data import DataLoader

    from focaldet.data import CocoDataModule, collate_detection

    with tempfile.TemporaryDirectory(prefix="focaldet-bench-") as tmp:
        ann, image_dir, name = _data_source(settings, Path(tmp))
        # configs/bccd.yaml's training resolution
        dm = CocoDataModule(train_ann=str(ann), train_images=str(image_dir), batch_size=settings.data_batch,
                            num_workers=settings.workers, min_size=[288, 320, 352], max_size=640,
                            persistent_workers=True)
        dm.setup("fit")
        dataset = dm.datasets["train"]
        limit = min(settings.data_images or len(dataset), len(dataset))
        if limit < len(dataset):
            dm.datasets["train"] = torch.utils.data.Subset(dataset, range(limit))
        paths = [str(dataset.image_dir / rec["file_name"]) for rec in dataset.records[:limit]]
        pipeline = dm.train_dataloader()  # also makes OpenCV single-threaded before any worker forks
        loader = functools.partial(DataLoader, batch_size=settings.data_batch, shuffle=True,
                                   num_workers=settings.workers, persistent_workers=settings.workers > 0)
        decode = loader(_DecodeOnly(paths), collate_fn=_list_collate)
        bare = copy.copy(dataset)  # the same records, no augmentation
        bare.transforms = None
        floor = loader(torch.utils.data.Subset(bare, range(limit)), collate_fn=collate_detection)
        log(settings, f"data: {name}, {limit} images per epoch, batch {settings.data_batch}, "
                       f"{settings.workers} workers")
        rates: dict[str, list[float]] = {"focaldet": [], "torchvision": [], "floor": []}
        runs = {
            "focaldet": lambda: _images_per_second(pipeline, lambda b: len(b["images"])),
            "torchvision": lambda: _images_per_second(decode, len),
            "floor": lambda: _images_per_second(floor, lambda b: len(b["images"])),
        }
        warmup = max(1, settings.warmup)  # at least one epoch: it starts the persistent workers
        for i in range(warmup):
            for side, fn in runs.items():
                log(settings, f"data: warm-up epoch {i + 1}/{warmup} {side}")
                fn()
        for i in range(settings.repeats):
            order = list(runs) if i % 2 == 0 else list(runs)[::-1]
            for side in order:
                rates[side].append(runs[side]())
            log(settings, f"data: repeat {i + 1}/{settings.repeats}  pipeline {rates['focaldet'][-1]:.1f} img/s  "
                           f"decode-only {rates['torchvision'][-1]:.1f} img/s  "
                           f"no augmentation {rates['floor'][-1]:.1f} img/s")
        del pipeline, decode, floor
    fd, tv, bare_rate = (statistics.median(rates[k]) for k in ("focaldet", "torchvision", "floor"))
    settings.notes["data"] = (f"{name}; torchvision column = decode-only limit; without augmentation "
                              f"{bare_rate:.0f} img/s = {bare_rate / tv:.2f} of it (pipeline = {fd / bare_rate:.2f} of that)")
    return {"focaldet": fd, "torchvision": tv, "ratio": fd / tv}


CASE = Case(case_data, unit="img/s", target=0.8)
