"""A model's recipe: the ``class_path`` tree a checkpoint stores to rebuild its own model.

The recipe has the form of the CLI's YAML, so a reader can copy it into a config::

    {"class_path": "focaldet.models.ResNetBackbone",
     "init_args": {"depth": 18, "norm": "frozen_bn", "freeze_at": 0, "weights": None}}

`describe` writes it from a live object, recording a class by its public path (where
``focaldet.models`` / ``focaldet.losses`` re-export it); `instantiate` builds the object
back, only from classes `focaldet.config.safe_load` allows (a subclass of what the argument
expects, from focaldet, ``torch.nn``, ``torch.optim`` or torchvision, unless the file is trusted). The rule
`describe` relies on: every constructor argument is kept on the object under its own name
(``self.depth = depth``), as focaldet's parts do. Arguments named ``weights`` or
``init_weights`` are recorded as ``None``: the checkpoint's state dict holds the weights.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from focaldet.errors import ConfigError
from focaldet.config.safe_load import public_path, resolve_class

__all__ = ["dataclass_of", "describe", "describe_callable", "instantiate", "plain", "recipe_value"]

WEIGHT_ARGS = ("weights", "init_weights")


def plain(value: Any) -> Any:
    """Tuples -> lists, recursively (YAML- and ``weights_only``-friendly)."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    return value


def describe(obj: Any) -> dict[str, Any] | None:
    """``{"class_path", "init_args"}`` of ``obj`` (``None`` for ``None``), parts nested in its
    arguments described too; raises ``ConfigError`` naming the arguments the object does not keep."""
    if obj is None:
        return None
    cls = type(obj)
    init_args, missing = {}, []
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if _weights_source(name, getattr(obj, name, None)):
            init_args[name] = None
        elif hasattr(obj, name):
            init_args[name] = recipe_value(getattr(obj, name))
        else:
            missing.append(name)
    if missing:
        raise ConfigError(f"{cls.__qualname__} does not keep its constructor argument(s) {missing} "
                          f"as attributes: a checkpoint cannot record how to rebuild it")
    return {"class_path": public_path(cls), "init_args": init_args}


def _weights_source(name: str, value: Any) -> bool:
    """Whether argument ``name`` names where weights come from (a file, a weights name, or
    nothing), which a recipe records as ``None``: the checkpoint's state dict holds the weights."""
    return name in WEIGHT_ARGS and isinstance(value, (str, os.PathLike, type(None)))


def describe_callable(fn: Any) -> dict[str, Any] | None:
    """The recipe of a class with some of its arguments bound (a ``functools.partial`` of a
    class, as ``focaldet.load`` builds, or the callable jsonargparse makes of a config's
    ``class_path`` for an ``optimizer: OptimizerCallable`` argument); ``None`` for ``None``."""
    if fn is None:
        return None
    if isinstance(fn, type):
        return {"class_path": public_path(fn), "init_args": {}}
    if isinstance(fn, functools.partial):
        classes = [a for a in (fn.func, *fn.args) if isinstance(a, type)]
        if classes:
            kwargs = {k: None if _weights_source(k, v) else recipe_value(v) for k, v in fn.keywords.items()}
            return {"class_path": public_path(classes[-1]), "init_args": kwargs}
    raise ConfigError(f"{fn!r} is not a class with bound arguments (a config's class_path, or "
                      "functools.partial(SomeClass, ...)): a checkpoint cannot record how to rebuild it")


def recipe_value(value: Any) -> Any:
    """A constructor argument as a checkpoint stores it: plain values as they are (tuples as
    lists), dataclasses as mappings of their fields, parts (modules, focaldet's classes) as
    `describe` trees, classes with bound arguments as `describe_callable` trees."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [recipe_value(v) for v in value]
    if isinstance(value, Mapping):
        return {k: recipe_value(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: recipe_value(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (functools.partial, type)):
        return describe_callable(value)
    from torch import nn

    if isinstance(value, nn.Module) or type(value).__module__.startswith("focaldet."):
        return describe(value)
    return value  # anything else as it is (weights_only refuses it on load, naming it)


def dataclass_of(cls: type, value: Any, what: str) -> Any:
    """A settings dataclass ``cls`` from itself, a mapping of its fields (YAML, a checkpoint's
    recipe) or ``None``; ``ConfigError`` naming ``what`` and the valid fields otherwise."""
    if value is None or isinstance(value, cls):
        return value
    fields = sorted(f.name for f in dataclasses.fields(cls))
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise ConfigError(f"{what}: unknown setting(s) {unknown}; valid: {fields}")
        return cls(**value)
    raise ConfigError(f"{what} must be a {cls.__name__}, a mapping of its fields or None, got {value!r}")


def instantiate(spec: Any, expected_base: type | None = None, trust: bool = False, bind: bool = False) -> Any:
    """Build the object a `describe` output (or a CLI ``class_path`` dict) names.

    The class must be a subclass of ``expected_base`` and live in focaldet, ``torch.nn``, ``torch.optim`` or
    torchvision, checked before anything is imported (`focaldet.config.safe_load.resolve_class`);
    ``expected_base=None`` accepts no class (plain values pass through). A ``class_path``
    nested in ``init_args`` must fit the annotation of that constructor argument.
    ``trust=True`` builds any class (a file the user made). ``ConfigError`` otherwise.
    ``bind=True``: ``functools.partial(cls, **init_args)`` instead of the object, for an
    argument that takes a class to call later (``model``, ``optimizer``, ``lr_scheduler``)."""
    if not (isinstance(spec, Mapping) and "class_path" in spec):
        return spec
    cls = resolve_class(str(spec["class_path"]), expected_base, trust)
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable annotations: nested classes need trust
        hints = {}
    kwargs = {k: instantiate(v, _class_of(hints.get(k)), trust) for k, v in (spec.get("init_args") or {}).items()}
    if bind:
        return functools.partial(cls, **kwargs)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{spec['class_path']}: {e}") from None


def _class_of(hint: Any) -> type | None:
    """The class an annotation admits (``X | None`` -> ``X``), or ``None``."""
    if isinstance(hint, type):
        return hint
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if len(args) == 1 and isinstance(args[0], type) else None


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The top-level mapping of a focaldet YAML config; `ConfigError` naming the file when it
    is missing, not valid YAML or not a mapping (an empty file reads as ``{}``)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return cfg
