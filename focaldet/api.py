"""``focaldet.load(path) -> Detector``: a trained model from its checkpoint alone.

The checkpoint carries everything (`RetinaNetModule.on_save_checkpoint`): the model's
recipe (``hyper_parameters``: every argument, parts as ``class_path`` trees), the label
map and the eval `InputSettings`. No config and no annotation file are needed::

    det = focaldet.load("runs/bccd/checkpoints/last.ckpt")
    for r in det.predict("photos/", score_threshold=0.3):
        print(r["names"], r["boxes"])

``Detector.predict`` prepares images exactly as ``focaldet validate`` does (the same decode,
the same albumentations eval pipeline, the same collate and normalisation), so its
detections scored with COCOeval give ``validate``'s mAP.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from focaldet.data.coco import IMAGE_EXTENSIONS, ImageFolderDataset, _apply_transforms
from focaldet.data.images import check_pixels
from focaldet.data.transforms import collate_detection
from focaldet.errors import ConfigError, DataError, WeightsError
from focaldet.evaluation.thresholds import ALL, load_thresholds, per_label_thresholds
from focaldet.inference.slicing import Slicing, sliced_detections
from focaldet.inputs import InputSettings
from focaldet.modeling.retinanet import RetinaNet
from focaldet.modeling.weights import read_weights_file
from focaldet.recipe import instantiate
from focaldet.safe_load import UnsafeFileError
from focaldet.structures.boxes import rescale_boxes

__all__ = ["CheckpointContents", "Detector", "check_recipe", "checkpoint_config", "load", "read_checkpoint"]

_NOT_INIT_ARGS = ("_instantiator", "_class_path")


@dataclass
class CheckpointContents:
    """What a focaldet checkpoint says about its model (see `read_checkpoint`)."""

    path: Path
    recipe: dict[str, Any]  # RetinaNetModule arguments, parts as class_path trees
    label_map: dict[str, list] | None
    inputs: InputSettings
    state_dict: dict[str, Tensor]


def read_checkpoint(path: str | os.PathLike) -> CheckpointContents:
    """The recipe, label map, input settings and weights of a focaldet checkpoint.

    Also reads the checkpoints written before the recipe was stored (format 1: the parts
    and the input settings are then taken from the run's resolved config)."""
    ckpt = read_weights_file(path, "checkpoint")
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise WeightsError(f"checkpoint {path}: not a focaldet checkpoint (no state_dict / hyper_parameters)")
    meta = ckpt.get("focaldet") or {}
    recipe = {k: v for k, v in dict(ckpt["hyper_parameters"]).items() if k not in _NOT_INIT_ARGS}
    label_map = meta.get("label_map") or recipe.get("label_map")
    inputs = meta.get("inputs")
    if meta.get("format", 1) < 2 and meta.get("config"):  # format 1: the parts live in the YAML only
        import yaml

        config = yaml.safe_load(meta["config"]) or {}
        model_cfg, data_cfg = config.get("model") or {}, config.get("data") or {}
        for key in ("backbone", "anchor_generator", "matcher", "postprocess", "cls_loss", "box_loss"):
            recipe.setdefault(key, model_cfg.get(key))
        if inputs is None:
            keys = ("min_size", "max_size", "size_divisibility", "eval_transforms")
            inputs = InputSettings.from_data(**{k: data_cfg[k] for k in keys if data_cfg.get(k) is not None})
    for key in ("label_map", "inputs", "init_weights"):
        recipe.pop(key, None)
    for key, spec in recipe.items():
        if isinstance(spec, Mapping) and "class_path" in spec and spec.get("init_args", {}) is None:
            raise WeightsError(f"checkpoint {path}: its {key} ({spec['class_path']}) did not record its "
                               "constructor arguments, so the model cannot be rebuilt from the checkpoint")
    return CheckpointContents(Path(path), recipe, label_map, InputSettings.from_dict(inputs), ckpt["state_dict"])


def check_recipe(contents: CheckpointContents, trust_code: bool = False) -> None:
    """Refuses, naming the checkpoint, a recipe part whose ``class_path`` focaldet does not build
    from a file (`focaldet.safe_load`): checked before anything is imported or built."""
    from focaldet.safe_load import check_path, recipe_bases

    bases = recipe_bases()
    for key, spec in contents.recipe.items():
        for where, class_path in _class_paths(spec, key):
            try:
                check_path(class_path, trust_code)
                if where not in bases and not trust_code and "." not in where:
                    raise ConfigError(f"{class_path}: no class is expected here")
            except ConfigError as e:
                raise UnsafeFileError(f"checkpoint {contents.path}: refused to build its {where}: {e}") from None


def _class_paths(spec: Any, where: str) -> list[tuple[str, str]]:
    """``(key, class_path)`` of every class a recipe value names, nested ones included."""
    if isinstance(spec, Mapping):
        found = [(where, str(spec["class_path"]))] if "class_path" in spec else []
        inner = spec.get("init_args") if "class_path" in spec else spec
        for k, v in (inner or {}).items() if isinstance(inner, Mapping) else ():
            found += _class_paths(v, f"{where}.{k}")
        return found
    if isinstance(spec, (list, tuple)):
        return [f for i, v in enumerate(spec) for f in _class_paths(v, f"{where}[{i}]")]
    return []


def build_module(contents: CheckpointContents, trust_code: bool = False):
    """A ``RetinaNetModule`` rebuilt from a checkpoint's recipe, with its weights; a part
    whose class focaldet does not build from a file is refused (`check_recipe`) unless
    ``trust_code``."""
    from focaldet.module import RetinaNetModule
    from focaldet.safe_load import recipe_bases

    check_recipe(contents, trust_code)
    bases = recipe_bases()
    try:
        kwargs = {k: instantiate(v, bases.get(k), trust_code) for k, v in contents.recipe.items()}
        module = RetinaNetModule(**kwargs, label_map=contents.label_map, inputs=contents.inputs.to_dict())
    except (ConfigError, TypeError) as e:
        raise WeightsError(f"checkpoint {contents.path}: cannot rebuild its model: {e}") from None
    try:
        module.load_state_dict(contents.state_dict)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[:2]
        raise WeightsError(f"checkpoint {contents.path}: weights do not fit its recipe: {' '.join(first)[:300]}") from None
    return module


def checkpoint_config(path: str | os.PathLike, trust_code: bool = False) -> str:
    """A YAML config that rebuilds a checkpoint's model and data settings (for
    ``focaldet predict --ckpt_path X`` without ``-c``): the recipe, the label map and the
    eval input settings."""
    import yaml

    from focaldet.recipe import plain

    contents = read_checkpoint(path)
    check_recipe(contents, trust_code)
    model = {k: v for k, v in contents.recipe.items() if k not in ("num_classes", "batch_size")}
    data = {"label_map": contents.label_map, **contents.inputs.data_args()}
    return yaml.safe_dump(plain({"model": model, "data": data}), sort_keys=False)


def load(path: str | os.PathLike, device: str | torch.device | None = None, trust_code: bool = False) -> Detector:
    """The `Detector` stored in a focaldet checkpoint (``device``: default CUDA when available).

    The checkpoint is read as weights only and its recipe may name only focaldet's own parts,
    ``torch.nn`` and torchvision classes of the type each argument expects; ``trust_code=True``
    builds any class it names (a checkpoint you made yourself: see docs/security.md)."""
    contents = read_checkpoint(path)
    module = build_module(contents, trust_code)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    return Detector(module.model.eval().to(device), contents.inputs, module.label_to_cat_id, module.class_names)


class _Images(ImageFolderDataset):
    """Paths, arrays, PIL images and tensors as the samples the eval pipeline makes; paths
    are read as `ImageFolderDataset` reads them (reduced decoding included)."""

    def __init__(self, items: Sequence[Any], transforms) -> None:
        self.items, self.transforms = list(items), transforms

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        if isinstance(item, Path):
            image, (h, w) = self._read(item, index)
            name = str(item)
        else:
            image = _to_rgb_array(item, index)
            (h, w), name = image.shape[:2], f"<input {index}>"
        sample = _apply_transforms(self.transforms, image, np.zeros((0, 4), np.float32), np.zeros((0,), np.int64))
        sample.update(image_id=index, orig_size=(int(h), int(w)), file_name=name)
        return sample


def _to_rgb_array(item: Any, index: int) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB from a numpy array, a PIL image or a ``(3, H, W)`` tensor; an
    empty image or one over `focaldet.data.images.MAX_PIXELS` is refused, as a file is."""
    image = _rgb_array(item, index)
    check_pixels(*image.shape[:2], f"input {index}")
    return image


def _rgb_array(item: Any, index: int) -> np.ndarray:
    if isinstance(item, Tensor):
        if item.ndim != 3 or item.shape[0] != 3:
            raise DataError(f"input {index}: a tensor image must be (3, H, W), got {tuple(item.shape)}")
        check_pixels(*item.shape[1:], f"input {index}")
        if item.is_floating_point():  # [0, 1] floats -> the uint8 the eval pipeline decodes to
            lo, hi = float(item.min()), float(item.max())
            if not (0.0 <= lo and hi <= 1.0):  # never clamp 0..255 floats to a binary image
                raise DataError(f"input {index}: a float tensor image must be in [0, 1], got values in "
                                f"[{lo:g}, {hi:g}] (divide by 255, or give a uint8 tensor)")
            item = (item.detach().float() * 255).round().to(torch.uint8)
        elif item.dtype != torch.uint8:
            raise DataError(f"input {index}: a tensor image must be float in [0, 1] or uint8, got {item.dtype}")
        return np.ascontiguousarray(item.permute(1, 2, 0).cpu().numpy())  # (3, H, W) -> (H, W, 3)
    if hasattr(item, "convert") and hasattr(item, "size"):  # PIL.Image
        return np.asarray(item.convert("RGB"))
    if isinstance(item, np.ndarray):
        if item.ndim == 2:
            item = np.repeat(item[:, :, None], 3, axis=2)
        if item.ndim != 3 or item.shape[2] != 3 or item.dtype != np.uint8:
            raise DataError(f"input {index}: a numpy image must be (H, W, 3) uint8 RGB, "
                            f"got {item.shape} {item.dtype}")
        return np.ascontiguousarray(item)
    raise DataError(f"input {index}: cannot read {type(item).__name__} as an image "
                    "(give a path, a folder, an (H, W, 3) uint8 array, a PIL image or a (3, H, W) tensor)")


def _expand(inputs: Any) -> list[Any]:
    """A path, a folder, or a list of them and of in-memory images -> a flat list."""
    if isinstance(inputs, (str, os.PathLike)):
        path = Path(inputs).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not files:
                raise DataError(f"image folder {path} has no images ({', '.join(IMAGE_EXTENSIONS)})")
            return files
        return [path]
    if isinstance(inputs, (list, tuple)):
        return [x for item in inputs for x in (_expand(item) if isinstance(item, (str, os.PathLike)) else [item])]
    return [inputs]


def read_thresholds(score_threshold: Any, names: Sequence[str]) -> Tensor | None:
    """Per-class thresholds ``(K,)`` from a number, a ``{name: score}`` mapping or a
    ``thresholds.json`` of ``focaldet validate`` (read by `load_thresholds`; its "all" entry
    stands in for a class without its own score, and classes it omits keep every detection)."""
    if score_threshold is None:
        return None
    source = score_threshold
    if isinstance(score_threshold, (str, os.PathLike)):
        score_threshold = load_thresholds(score_threshold)
    if isinstance(score_threshold, Mapping):
        unknown = sorted(set(score_threshold) - set(names) - {ALL})
        if unknown:
            where = f"{source} " if isinstance(source, (str, os.PathLike)) else ""
            raise DataError(f"score thresholds {where}name unknown classes {unknown}; "
                            f"the model's classes are {list(names)}")
        score_threshold = {k: (v.get("score") if isinstance(v, Mapping) else v) for k, v in score_threshold.items()}
        score_threshold = {k: float(v) for k, v in score_threshold.items() if v is not None}
    elif not isinstance(score_threshold, (int, float)) or isinstance(score_threshold, bool):
        raise DataError(f"score_threshold must be a number, a {{name: score}} mapping or a JSON file, got {source!r}")
    return torch.as_tensor(per_label_thresholds(score_threshold, names), dtype=torch.float32)


class Detector:
    """A trained RetinaNet with its classes and eval settings.

    Attributes:
        model: the ``RetinaNet``, in eval mode; its own ``predict`` (tensors) resizes as ``inputs`` say.
        inputs: the checkpoint's `InputSettings`.
        category_ids: contiguous label -> dataset category id.
        names: contiguous label -> class name.
        device: where the model runs.
    """

    def __init__(self, model: RetinaNet, inputs: InputSettings, category_ids: Sequence[int], names: Sequence[str]):
        self.model, self.inputs = model, inputs
        self.category_ids, self.names = [int(c) for c in category_ids], [str(n) for n in names]
        self._transforms = inputs.eval_pipeline()

    @property
    def device(self) -> torch.device:
        return self.model.pixel_mean.device

    def predict(self, inputs: Any, score_threshold: float | Mapping | str | os.PathLike | None = None,
                batch_size: int = 8, slicing: Slicing | Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """Detections per image, in input order.

        ``inputs``: an image path, a folder (its images sorted by name), a list of paths, or
        ``(H, W, 3)`` uint8 RGB arrays, PIL images, ``(3, H, W)`` float tensors in [0, 1]
        (quantised to uint8, as a decoded file is). Each result: ``boxes (M, 4)`` xyxy in the
        original image's pixels, ``scores (M,)``, ``labels (M,)`` contiguous,
        ``category_ids (M,)`` the dataset's ids, ``names`` (M strings) and ``file_name``.
        ``score_threshold``: see `read_thresholds`; the postprocess's own ``score_thresh``
        has already been applied.
        ``slicing``: sliced inference (`focaldet.inference.Slicing`, or a mapping of its
        fields, e.g. ``{"size": 512}``): each image is read at its original size and cut into
        windows, each window prepared as a whole image is without slicing; detections are
        merged with class-aware NMS (``postprocess.nms_thresh``, ``detections_per_img``).
        """
        slicing = Slicing.of(slicing)
        dataset = _Images(_expand(inputs), None if slicing is not None else self._transforms)
        thresholds = read_thresholds(score_threshold, self.names)
        cat_ids = torch.tensor(self.category_ids)
        results = []
        for start in range(0, len(dataset), max(int(batch_size), 1)):
            samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            if slicing is not None:  # original-size images: cut, then each window through the eval pipeline
                post = self.model.postprocess
                found = sliced_detections([s["image"] for s in samples], self._detect, slicing, self._transforms,
                                          self.inputs.size_divisibility, post.nms_thresh, post.detections_per_img)
                names = [s["file_name"] for s in samples]
            else:
                batch = collate_detection(samples, self.inputs.size_divisibility)
                found, names = self._detect(batch), batch["file_names"]
            for det, name in zip(found, names):
                det = {k: v.cpu() for k, v in det.items()}
                if thresholds is not None:
                    keep = det["scores"] >= thresholds[det["labels"]]
                    det = {k: v[keep] for k, v in det.items()}
                det["category_ids"] = cat_ids[det["labels"]]
                det["names"] = [self.names[i] for i in det["labels"].tolist()]
                det["file_name"] = name
                results.append(det)
        return results

    @torch.inference_mode()
    def _detect(self, batch: dict) -> list[dict[str, Tensor]]:
        """``RetinaNetModule._detect``'s steps: normalise, run, decode, back to original pixels."""
        model, device = self.model, self.device
        images, sizes = batch["images"].to(device), batch["image_sizes"].to(device)
        detections = model.detect(model(model.normalize(images, sizes)), sizes)
        for det, size, orig in zip(detections, sizes.tolist(), batch["orig_sizes"].tolist()):
            det["boxes"] = rescale_boxes(det["boxes"], size, orig)
        return detections

    def __repr__(self) -> str:
        return f"Detector({len(self.names)} classes {self.names}, inputs={self.inputs}, device={self.device})"

