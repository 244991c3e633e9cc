"""Recipes and configs of earlier focaldet versions, read in today's terms.

Up to checkpoint format 2, ``RetinaNetModule`` took 37 flat arguments (``fpn_channels``,
``cls_loss``, ``base_lr``, ``lr_steps``, ``max_dets``, ...). It now takes parts: ``model``
(RetinaNet's arguments), ``criterion``, ``optimizer``, ``lr_scheduler``, ``evaluation`` and
``prediction``. `upgrade_recipe` moves a checkpoint's flat recipe into those parts (so every
checkpoint ever written still loads), and `moved_key` names the new home of a flat key a
user still types (``--model.base_lr``, a config's ``model.lr_steps``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["FLAT_KEYS", "moved_key", "upgrade_recipe"]

MODEL_KEYS = ("backbone", "anchor_generator", "postprocess", "fpn_channels", "p6_from", "num_convs", "head_norm",
              "prior_prob", "channels_last")
CRITERION_KEYS = ("cls_loss", "box_loss", "matcher", "normalizer_momentum", "crowd_ioa_threshold")
SCHEDULE_KEYS = {"warmup_iters": "warmup_iters", "warmup_factor": "warmup_factor", "lr_steps": "milestones",
                 "lr_gamma": "gamma"}
EVALUATION_KEYS = {"eval_backend": "backend", "max_dets": "max_dets"}
PREDICTION_KEYS = {"score_threshold": "score_threshold", "draw_predictions": "draw",
                   "draw_score_threshold": "draw_score_threshold"}
OPTIMIZERS = {"sgd": "torch.optim.SGD", "adamw": "torch.optim.AdamW"}
SCHEDULE_CLASS = "focaldet.engine.schedules.WarmupMultiStepLR"

# every flat key -> where it lives now (for messages)
FLAT_KEYS: dict[str, str] = {
    **{k: f"model.model.{k}" for k in MODEL_KEYS},
    **{k: f"model.criterion.{k}" for k in CRITERION_KEYS},
    "optimizer": "a torch.optim class: model.optimizer: {class_path: torch.optim.AdamW, init_args: {lr: 0.002}}",
    "base_lr": "model.optimizer.init_args.lr", "momentum": "model.optimizer.init_args.momentum",
    "weight_decay": "model.optimizer.init_args.weight_decay",
    **{k: f"model.lr_scheduler.init_args.{v} ({SCHEDULE_CLASS})" for k, v in SCHEDULE_KEYS.items()},
    **{k: f"model.evaluation.{v}" for k, v in EVALUATION_KEYS.items()},
    **{k: f"model.prediction.{v}" for k, v in PREDICTION_KEYS.items()},
}


def moved_key(key: str, value: Any = None) -> str | None:
    """``"model.base_lr"`` -> a sentence naming its new home; ``None`` for a current key.
    ``model.optimizer`` is a current key too, unless its ``value`` is the old ``sgd`` / ``adamw``."""
    name = key.split(".", 1)[1] if key.startswith("model.") else None
    if name is None or name.split(".")[0] not in FLAT_KEYS:
        return None
    head = name.split(".")[0]
    if head == "optimizer" and (name != head or str(value).lower() not in OPTIMIZERS):
        return None
    return f"model.{head} is now {FLAT_KEYS[head]} (the module takes parts: docs/training.md#the-modules-parts)"


def is_flat(recipe: Mapping[str, Any]) -> bool:
    """Whether a recipe (or a config's ``model`` section) uses the flat keys of format <= 2."""
    return any(k in recipe for k in FLAT_KEYS) and not isinstance(recipe.get("model"), Mapping)


def upgrade_recipe(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """A format <= 2 recipe (flat ``RetinaNetModule`` arguments) in today's parts; a current
    recipe is returned as it is. Defaults that were not stored stay defaults."""
    if not is_flat(recipe):
        return dict(recipe)
    old = dict(recipe)
    new: dict[str, Any] = {k: old.pop(k) for k in ("num_classes", "base_batch_size", "batch_size",
                                                   "decay_norm_and_bias", "nonfinite", "flush_denormal",
                                                   "init_weights") if k in old}
    model = {k: old.pop(k) for k in MODEL_KEYS if k in old}
    new["model"] = {"class_path": "focaldet.models.RetinaNet", "init_args": model}
    criterion = {k: old.pop(k) for k in CRITERION_KEYS if k in old}
    new["criterion"] = {"class_path": "focaldet.losses.RetinaNetCriterion", "init_args": criterion}
    name = old.pop("optimizer", "sgd")
    optimizer = {"lr": old.pop("base_lr", 0.01)}
    momentum, weight_decay = old.pop("momentum", 0.9), old.pop("weight_decay", 1e-4)
    if name == "sgd":
        optimizer["momentum"] = momentum
    optimizer["weight_decay"] = weight_decay
    new["optimizer"] = {"class_path": OPTIMIZERS.get(name, OPTIMIZERS["sgd"]), "init_args": optimizer}
    schedule = {new_name: old.pop(k) for k, new_name in SCHEDULE_KEYS.items() if k in old}
    if schedule.get("milestones") is None:
        schedule.pop("milestones", None)
    new["lr_scheduler"] = {"class_path": SCHEDULE_CLASS, "init_args": schedule}
    new["evaluation"] = {v: old.pop(k) for k, v in EVALUATION_KEYS.items() if k in old}
    new["prediction"] = {v: old.pop(k) for k, v in PREDICTION_KEYS.items() if k in old}
    new.update(old)  # anything else (label_map, inputs, ...) as it was
    return new


def check_moved_keys(configs: list[str], args: list[str]) -> None:
    """``ConfigError`` naming the file (or the flag) and the new key when a config's ``model``
    section or a ``--model.X`` flag still uses a flat key of format <= 2."""
    from focaldet.config.recipe import read_config_file
    from focaldet.errors import ConfigError

    for config in configs:
        model = read_config_file(config).get("model")
        if isinstance(model, Mapping):
            for key, value in model.items():
                moved = moved_key(f"model.{key}", value)
                if moved:
                    raise ConfigError(f"config {config}: {moved}")
    for i, arg in enumerate(args):
        flag, _, value = arg.partition("=")
        if flag.startswith("--model."):
            moved = moved_key(flag[2:], value if _ else (args[i + 1] if i + 1 < len(args) else None))
            if moved:
                raise ConfigError(f"{flag}: {moved}")
