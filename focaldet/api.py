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

import torch
from torch import Tensor

from focaldet.errors import ConfigError, WeightsError
from focaldet.inference.predictor import Predictor, read_thresholds
from focaldet.inference.slicing import Slicing
from focaldet.config.inputs import InputSettings
from focaldet.modeling.retinanet import RetinaNet
from focaldet.modeling.weights import read_weights_file
from focaldet.config.migrate import upgrade_recipe
from focaldet.config.recipe import instantiate
from focaldet.config.safe_load import UnsafeFileError

__all__ = ["CheckpointContents", "Detector", "check_recipe", "checkpoint_config", "load", "read_checkpoint",
           "read_thresholds"]

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
    recipe = upgrade_recipe(recipe)  # format <= 2: flat arguments -> parts
    for key, spec in recipe.items():
        if isinstance(spec, Mapping) and "class_path" in spec and spec.get("init_args", {}) is None:
            raise WeightsError(f"checkpoint {path}: its {key} ({spec['class_path']}) did not record its "
                               "constructor arguments, so the model cannot be rebuilt from the checkpoint")
    return CheckpointContents(Path(path), recipe, label_map, InputSettings.from_dict(inputs), ckpt["state_dict"])


def check_recipe(contents: CheckpointContents, trust_code: bool = False) -> None:
    """Refuses, naming the checkpoint, a recipe part whose ``class_path`` focaldet does not build
    from a file (`focaldet.config.safe_load`): checked before anything is imported or built."""
    from focaldet.config.safe_load import check_path, recipe_bases

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
    from focaldet.engine.module import RetinaNetModule
    from focaldet.config.safe_load import BOUND_ARGS, recipe_bases

    check_recipe(contents, trust_code)
    bases = recipe_bases()
    try:
        kwargs = {k: instantiate(v, bases.get(k), trust_code, bind=k in BOUND_ARGS) for k, v in contents.recipe.items()}
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

    from focaldet.config.recipe import plain

    contents = read_checkpoint(path)
    check_recipe(contents, trust_code)
    model = {k: v for k, v in contents.recipe.items() if k not in ("num_classes", "batch_size")}
    data = {"label_map": contents.label_map, **contents.inputs.data_args()}
    return yaml.safe_dump(plain({"model": model, "data": data}), sort_keys=False)


def load(path: str | os.PathLike, device: str | torch.device | None = None, trust_code: bool = False) -> Detector:
    """The `Detector` stored in a focaldet checkpoint (``device``: default CUDA when available).

    The checkpoint is read as weights only and its recipe may name only focaldet's own parts,
    ``torch.nn``, ``torch.optim`` and torchvision classes of the type each argument expects; ``trust_code=True``
    builds any class it names (a checkpoint you made yourself: see docs/security.md)."""
    contents = read_checkpoint(path)
    module = build_module(contents, trust_code)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    return Detector(module.model.eval().to(device), contents.inputs, module.label_to_cat_id, module.class_names)


class Detector:
    """A trained RetinaNet with its classes and eval settings: `focaldet.inference.Predictor`
    with the checkpoint's inputs, classes and score threshold.

    Attributes:
        model: the ``RetinaNet``, in eval mode.
        inputs: the checkpoint's `InputSettings`.
        category_ids: contiguous label -> dataset category id.
        names: contiguous label -> class name.
        predictor: the `Predictor` every call goes through.
        device: where the model runs.
    """

    def __init__(self, model: RetinaNet, inputs: InputSettings, category_ids: Sequence[int], names: Sequence[str],
                 score_threshold: Any = None):
        self.predictor = Predictor(model, inputs, category_ids, names, score_threshold=score_threshold)
        self.model, self.inputs = model, self.predictor.inputs
        self.category_ids, self.names = self.predictor.category_ids, self.predictor.names

    @property
    def device(self) -> torch.device:
        return self.predictor.device

    def predict(self, inputs: Any, score_threshold: float | Mapping | str | os.PathLike | None = None,
                batch_size: int = 8, slicing: Slicing | Mapping[str, Any] | None = None,
                tta: Any = None) -> list[dict[str, Any]]:
        """Detections per image, in input order.

        ``inputs``: an image path, a folder (its images sorted by name), a list of paths, or
        ``(H, W, 3)`` uint8 RGB arrays, PIL images, ``(3, H, W)`` float tensors in [0, 1]
        (quantised to uint8, as a decoded file is). Each result: ``boxes (M, 4)`` xyxy in the
        original image's pixels, ``scores (M,)``, ``labels (M,)`` contiguous,
        ``category_ids (M,)`` the dataset's ids, ``names`` (M strings) and ``file_name``.
        An image's detections do not depend on ``batch_size`` or on the other images
        (`focaldet.inference.predictor`'s batch rule).
        ``score_threshold``: see `read_thresholds`; the postprocess's own ``score_thresh``
        has already been applied.
        ``tta``: test-time augmentation (`focaldet.inference.tta.TTA`, or ``{"flip": True,
        "scales": [...]}``): each image also run mirrored and at the given shorter sides, the
        views merged by class-wise NMS.
        ``slicing``: sliced inference (`focaldet.inference.Slicing`, or a mapping of its
        fields, e.g. ``{"size": 512}``): each image is read at its original size and cut into
        windows, each window prepared as a whole image is without slicing; detections are
        merged with class-aware NMS (``postprocess.nms_thresh``, ``detections_per_img``).
        """
        return self.predictor(inputs, score_threshold=score_threshold, batch_size=batch_size, slicing=slicing,
                              tta=tta)

    def __repr__(self) -> str:
        return f"Detector({len(self.names)} classes {self.names}, inputs={self.inputs}, device={self.device})"
