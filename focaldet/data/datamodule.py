"""`CocoDataModule`: COCO-format train/val/test data and image-folder prediction for Lightning."""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import cv2
import lightning as L
import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, get_worker_info

from focaldet.data.coco import CocoDetection, DataWarning, ImageFolderDataset, LabelMap, load_coco, subset_coco
from focaldet.data.images import ImageError
from focaldet.data.lean import LeanAnnotations, RecordTable, load_lean
from focaldet.data.sampling import REPEAT_THRESHOLD, RepeatFactorSampler, RepeatRule, repeat_factors
from focaldet.data.scan import release_cache_memory, scan_images
from focaldet.data.transforms import build_transforms, collate_detection
from focaldet.errors import ConfigError, DataError
from focaldet.config.inputs import InputSettings

__all__ = ["CocoDataModule"]

_STAGE_ALIASES = {"train": "train", "fit": "train", "val": "val", "validate": "val", "test": "test"}
_BAD_IMAGES = ("raise", "skip")
_SAMPLERS = ("shuffle", "repeat_factor")
MAX_LISTED = 100  # bad files named in one error or warning


def disable_opencv_threads() -> None:
    """Run OpenCV single-threaded in this process, before DataLoader workers are forked.

    OpenCV's thread pool does not survive ``fork()``: a worker forked after the main process
    used it (e.g. a resize in a ``num_workers=0`` validation loop) hangs for ever in its first
    call that touches the pool -- ``cv2.setNumThreads`` included (observed: the worker blocks
    in ``pthread_cond_destroy``). With no pool in the parent there is none to inherit, and
    the workers, which already run in parallel, should not start threads of their own anyway.
    """
    cv2.setNumThreads(0)


def _seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: give each worker its own augmentation random state.

    albumentations keeps a private RNG inside ``Compose``; forked workers would all inherit
    the same one (and restart it every epoch), so reseed it from torch's per-worker seed,
    which Lightning's ``seed_everything`` makes reproducible.
    """
    info = get_worker_info()
    transforms = getattr(info.dataset, "transforms", None) if info is not None else None
    if hasattr(transforms, "set_random_seed"):
        transforms.set_random_seed(torch.initial_seed() % 2**32)


def _listing(items: list[str]) -> str:
    """``"a; b; c"``, at most `MAX_LISTED` of them, then how many more."""
    more = f"; ... and {len(items) - MAX_LISTED} more (focaldet data check lists all)" if len(items) > MAX_LISTED else ""
    return "; ".join(items[:MAX_LISTED]) + more


class CocoDataModule(L.LightningDataModule):
    """COCO-format detection data.

    Args:
        train_ann, train_images: COCO instances JSON and image folder for training.
        val_ann, val_images: same for validation (also the evaluator's ground truth).
        test_ann, test_images: same for testing.
        predict_images: folder of unlabelled images for ``predict``.
        batch_size: images per device and step.
        num_workers: DataLoader worker processes.
        pin_memory: pin batches (only when CUDA is available).
        persistent_workers: keep workers between epochs (only when ``num_workers > 0``).
        min_size: shorter side after resizing; a list is sampled per image in training
            (multi-scale), evaluation uses its largest value. ``None``: 800 (the paper's), or
            with ``train_transforms``/``eval_transforms`` the sizes of their resize, so that a
            config that sets its size in the transforms shows no second, unused one.
        max_size: cap on the longer side after resizing (``None``: 1333, as ``min_size``).
        hflip_prob: horizontal flip probability in training.
        train_transforms, eval_transforms: albumentations config lists replacing the default
            pipelines (see `focaldet.data.transforms`).
        size_divisibility: batches are padded to a multiple of this (128 = P7 stride).
        filter_empty: drop training images without boxes.
        label_map: ``LabelMap.to_dict()`` output, for predict-only use when no annotation
            file is given (e.g. taken from a checkpoint).
        bad_images: what `setup` does with images that are missing, undecodable or of
            another size than their JSON entry says: ``"raise"`` an `ImageError` listing all
            of them, or ``"skip"`` them (and their annotations; the evaluation leaves them
            out too) with one `DataWarning` naming each.
        eval_original_size: hand over val/test/predict images at their original size,
            without the eval pipeline (boxes stay in original pixels): the model then
            prepares them itself, e.g. for sliced inference (``model.slicing``, which sets this
            on the CLI). ``inputs`` still describes the eval pipeline the model applies.

    `setup` decodes every image of the splits it builds once (`focaldet.data.scan`, in
    threads, cached per folder), so that no epoch dies on a bad file; truncated JPEGs are
    read (their lost rows gray) with a warning naming them.

    The label map is read at construction from the first annotation file given (train,
    else val, else test), so ``num_classes`` is known before the model is built.
    """

    def __init__(
        self,
        train_ann: str | None = None,
        train_images: str | None = None,
        val_ann: str | None = None,
        val_images: str | None = None,
        test_ann: str | None = None,
        test_images: str | None = None,
        predict_images: str | None = None,
        batch_size: int = 4,
        num_workers: int = 2,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        min_size: int | list[int] | None = None,
        max_size: int | None = None,
        hflip_prob: float = 0.5,
        train_transforms: list[dict[str, Any]] | None = None,
        eval_transforms: list[dict[str, Any]] | None = None,
        size_divisibility: int = InputSettings.size_divisibility,
        filter_empty: bool = False,
        label_map: dict | None = None,
        bad_images: Literal["raise", "skip"] = "raise",
        sampler: Literal["shuffle", "repeat_factor"] = "shuffle",
        repeat_threshold: float = REPEAT_THRESHOLD,
        repeat_rule: RepeatRule = "sqrt",
        eval_original_size: bool = False,
    ) -> None:
        super().__init__()
        if bad_images not in _BAD_IMAGES:
            raise ConfigError(f"data.bad_images must be one of {list(_BAD_IMAGES)}, got {bad_images!r}")
        if sampler not in _SAMPLERS:
            raise ConfigError(f"data.sampler must be one of {list(_SAMPLERS)}, got {sampler!r}")
        repeat_factors([], repeat_threshold, repeat_rule)  # checks the two values
        self.sampler = sampler
        self.repeat_threshold = repeat_threshold
        self.repeat_rule = repeat_rule
        self.bad_images = bad_images
        self.paths = {
            "train": (train_ann, train_images),
            "val": (val_ann, val_images),
            "test": (test_ann, test_images),
        }
        for split, (ann, images) in self.paths.items():
            if (ann is None) != (images is None):
                raise ConfigError(f"{split}_ann and {split}_images must be given together")
        self.predict_images = predict_images
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        # the one home of the defaults is InputSettings
        self.min_size = InputSettings.min_size if min_size is None else min_size
        self.max_size = InputSettings.max_size if max_size is None else max_size
        self.hflip_prob = hflip_prob
        self.train_transforms = train_transforms
        self.eval_transforms = eval_transforms
        self.size_divisibility = size_divisibility
        self.filter_empty = filter_empty
        self.eval_original_size = eval_original_size

        self._cocos: dict[Path, COCO] = {}
        self._lean: LeanAnnotations | None = None  # the train split: flat arrays, no COCO object
        self._gt: dict[str, COCO] = {}  # a split's ground truth without its skipped images
        self.datasets: dict[str, CocoDetection | ImageFolderDataset] = {}
        self._label_map = LabelMap.from_dict(label_map) if label_map is not None else None
        first = next((split for split in ("train", "val", "test") if self.paths[split][0] is not None), None)
        if first is not None:
            categories = self._train_lean().categories if first == "train" else self._coco(first).dataset["categories"]
            json_map = LabelMap.from_categories(categories)
            if self._label_map is not None and self._label_map.cat_ids != json_map.cat_ids:
                raise DataError(
                    f"{self.paths[first][0]}: category ids {json_map.cat_ids} differ from the "
                    f"given label_map's {self._label_map.cat_ids}"
                )
            self._label_map = self._label_map or json_map

    # ----------------------------------------------------------------------------------
    # Label map and ground truth
    # ----------------------------------------------------------------------------------

    @property
    def label_map(self) -> LabelMap:
        """Category id <-> contiguous label mapping (from the annotations or ``label_map``)."""
        if self._label_map is None:
            raise ConfigError("no annotation file and no label_map given: the classes are unknown")
        return self._label_map

    @property
    def inputs(self) -> InputSettings:
        """The eval settings (resize, padding) that checkpoints store and ``predict`` reuses."""
        return InputSettings.from_data(self.min_size, self.max_size, self.size_divisibility, self.eval_transforms)

    @property
    def num_classes(self) -> int:
        return self.label_map.num_classes

    def _coco(self, split: str) -> COCO:
        """Parsed ``COCO`` of a split's annotation file, parsed once and cached."""
        ann = self.paths[split][0]
        if ann is None:
            raise ConfigError(f"no {split}_ann given")
        key = Path(ann).resolve()
        if key not in self._cocos:
            self._cocos[key] = load_coco(key)
        return self._cocos[key]

    def _train_lean(self) -> LeanAnnotations:
        """The train split's annotations as flat arrays (`focaldet.data.lean`), loaded once
        (from ``$FOCALDET_CACHE/annotations`` while the JSON is unchanged)."""
        if self._lean is None:
            self._lean = load_lean(self.paths["train"][0])
        return self._lean

    def coco_gt(self, stage: str = "val") -> COCO:
        """pycocotools ground truth of ``"val"``/``"validate"`` or ``"test"`` (for the evaluator)."""
        split = _STAGE_ALIASES.get(stage)
        if split is None:
            raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(_STAGE_ALIASES)}")
        return self._gt.get(split) or self._coco(split)

    # ----------------------------------------------------------------------------------
    # Datasets and loaders
    # ----------------------------------------------------------------------------------

    def _transforms(self, train: bool) -> Callable | None:
        if not train:
            return None if self.eval_original_size else self.inputs.eval_pipeline()
        # Seed the augmentation RNG from torch, so seed_everything() makes num_workers=0 runs
        # reproducible too (workers reseed it in _seed_worker).
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
        return build_transforms(
            train, self.min_size, self.max_size, self.hflip_prob, transforms=self.train_transforms, seed=seed
        )

    def _coco_dataset(self, split: str) -> CocoDetection:
        ann, images = self.paths[split]
        train = split == "train"
        return CocoDetection(
            ann,
            images,
            transforms=self._transforms(train=train),
            filter_empty=self.filter_empty and train,
            coco=None if train else self._coco(split),
            label_map=self._label_map,
            lean=self._train_lean() if train else None,
        )

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets a stage needs (all available ones for ``stage=None``)."""
        splits = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["predict"]}
        if stage in ("validate", "test", "predict"):  # never a silent run over nothing (fit may skip validation)
            (split,) = splits[stage]
            if (self.predict_images if split == "predict" else self.paths[split][0]) is None:
                flags = "--data.predict_images" if split == "predict" else f"--data.{split}_ann and --data.{split}_images"
                raise ConfigError(f"{getattr(stage, 'value', stage)} has no data to run on: give {flags} "
                                  "(a checkpoint records the recipe, label map and eval size, not the dataset)")
        for split in splits.get(stage, ["train", "val", "test", "predict"]):
            if split in self.datasets:
                continue
            if split == "predict":
                if self.predict_images is not None:
                    dataset = ImageFolderDataset(self.predict_images, self._transforms(train=False))
                    self._check_images(split, dataset)
                    self.datasets[split] = dataset
            elif self.paths[split][0] is not None:
                dataset = self._coco_dataset(split)
                self._check_images(split, dataset)
                self.datasets[split] = dataset
        release_cache_memory()  # the scan cache's entries, read once for all splits

    def _check_images(self, split: str, dataset: CocoDetection | ImageFolderDataset) -> None:
        """Decode every image of ``dataset`` once; raise for (or drop) the bad ones."""
        if isinstance(dataset, ImageFolderDataset):
            folder, source = dataset.image_dir, "predict_images"
            entries = [(name, f"{name}", None, None) for name in dataset.files]
        elif isinstance(dataset.records, RecordTable):  # columns, not 118k record dicts
            folder, source, t = dataset.image_dir, str(dataset.ann_file), dataset.records
            entries = [(n, f"{n} (image id {i})", h, w) for n, i, h, w in
                       zip(t.file_names.tolist(), t.image_ids.tolist(), t.heights.tolist(), t.widths.tolist())]
        else:
            folder, source = dataset.image_dir, str(dataset.ann_file)
            entries = [(r["file_name"], f"{r['file_name']} (image id {r['image_id']})", r["height"], r["width"])
                       for r in dataset.records]
        scans = scan_images(folder, [name for name, *_ in entries], desc=f"checking {split} images")
        bad, truncated = [], []
        for name, where, height, width in entries:
            problem = scans[name].problem(height, width)
            if problem is not None:
                bad.append((name, f"{where}: {problem}"))
            elif scans[name].truncated:
                truncated.append(where)
        if truncated:
            warnings.warn(f"{_listing(truncated)} {'is a' if len(truncated) == 1 else 'are'} truncated "
                          f"JPEG{'s' * (len(truncated) > 1)} in {folder}, read with the lost rows gray",
                          DataWarning, stacklevel=2)
        if not bad:
            return
        what = f"{len(bad)} bad image{'s' * (len(bad) > 1)} in {folder} (for {source})"
        if self.bad_images == "raise":
            raise ImageError(f"{what}: {_listing([w for _, w in bad])} (data.bad_images: skip drops them)")
        names = {name for name, _ in bad}
        if isinstance(dataset, ImageFolderDataset):
            dataset.files = [f for f in dataset.files if f not in names]
            dropped = ""
        elif isinstance(dataset.records, RecordTable):
            table = dataset.records
            kept = table.take(np.flatnonzero([n not in names for n in table.file_names.tolist()]))
            boxes = table.num_boxes() - kept.num_boxes()
            dataset.records = kept
            if split != "train":
                self._gt[split] = subset_coco(self._coco(split), kept.image_ids.tolist())
            dropped = f" and their {boxes} box{'es' * (boxes != 1)}"
        else:
            kept = [r for r in dataset.records if r["file_name"] not in names]
            boxes = sum(len(r["boxes"]) for r in dataset.records) - sum(len(r["boxes"]) for r in kept)
            dataset.records = kept
            if split != "train":
                self._gt[split] = subset_coco(self._coco(split), [r["image_id"] for r in kept])
            dropped = f" and their {boxes} box{'es' * (boxes != 1)}"
        if not len(dataset):
            raise ImageError(f"{what}: {_listing([w for _, w in bad])}; no image is left")
        warnings.warn(f"skipping {what}{dropped} (data.bad_images: skip): {_listing([w for _, w in bad])}",
                      DataWarning, stacklevel=2)

    def train_sampler(self) -> RepeatFactorSampler | None:
        """The repeat-factor sampler of the training set (``None`` for ``sampler: shuffle``).

        Rank and world size come from the attached trainer (else the process group); the seed
        is Lightning's ``PL_GLOBAL_SEED`` (set by ``seed_everything``), the same on every rank.
        """
        if self.sampler != "repeat_factor":
            return None
        dataset = self.datasets["train"]
        factors = repeat_factors([r["labels"].tolist() for r in dataset.records], self.repeat_threshold,
                                 self.repeat_rule)
        trainer = getattr(self, "trainer", None)
        world = {} if trainer is None else {"num_replicas": trainer.world_size, "rank": trainer.global_rank}
        return RepeatFactorSampler(factors, seed=int(os.getenv("PL_GLOBAL_SEED", 0)), **world)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test", "predict": "predict"}[split])
        if split not in self.datasets:
            what = "predict_images" if split == "predict" else f"{split}_ann and {split}_images"
            raise ConfigError(f"no {split} data: set {what}")
        if self.num_workers > 0:
            disable_opencv_threads()
        sampler = self.train_sampler() if split == "train" else None
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            drop_last=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            collate_fn=functools.partial(collate_detection, size_divisibility=self.size_divisibility),
            worker_init_fn=_seed_worker,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches; an empty list (no validation) when no ``val_ann`` is set."""
        if self.paths["val"][0] is None:
            return []
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", shuffle=False)
