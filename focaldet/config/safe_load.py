"""What focaldet reads from a file it did not write itself, and what it builds from one: ONE place.

A checkpoint, a ``.pt2`` program or a config can come from a stranger (a model hub, a repo).
Nothing in such a file runs code here:

- **pickles**: every ``torch.load`` of a user file goes through :func:`load_torch_file`,
  always ``weights_only=True``; the only globals it allows beyond PyTorch's own tensor and
  container types are :data:`SAFE_GLOBALS`. A file that asks for anything else is refused in
  one line naming it (:class:`UnsafeFileError`).
- **recipes** (a checkpoint's ``class_path`` trees, `focaldet.config.recipe`): :func:`resolve_class`
  builds a class only if its path lies in :data:`TRUSTED_ROOTS` (checked *before* anything is
  imported) and it is a subclass of what the argument expects (:func:`recipe_bases`). Paths
  of earlier focaldet versions are read through :data:`ALIASES`.
- **configs**: `import_policy` makes jsonargparse (the CLI's parser) refuse to import a
  ``class_path`` outside :data:`CLI_IMPORT_ROOTS`.
- **.pt2** programs: :func:`check_pt2` refuses an archive whose payloads are pickles
  ``torch.export.load`` would run (it falls back to full unpickling, ``weights_only`` off) or compiled code.

``trust=True`` (``focaldet.load(path, trust_code=True)``, ``--trust_checkpoint_code``) lifts
the class-path and ``.pt2`` rules for a file the user made: see docs/security.md. Pickles
stay weights-only even then: focaldet never writes a checkpoint that needs more.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any

from focaldet.errors import CheckpointError, ConfigError, WeightsError

__all__ = ["ALIASES", "CLI_IMPORT_ROOTS", "SAFE_GLOBALS", "TRUSTED_ROOTS", "UnsafeFileError",
           "check_pt2", "import_policy", "load_torch_file", "public_path", "recipe_bases", "resolve_class"]

# Globals a focaldet / Lightning checkpoint may reference beyond torch's weights_only defaults
# (tensors, dicts, lists, tuples, OrderedDict, numbers, strings). None today: keep it so.
SAFE_GLOBALS: tuple = ()

# Where a recipe's class may live without trust: imported only then, and only these packages.
TRUSTED_ROOTS = ("focaldet", "torch.nn", "torch.optim", "torchvision")
# What the CLI's config parser may import (its callbacks, loggers, strategies come from Lightning).
CLI_IMPORT_ROOTS = (*TRUSTED_ROOTS, "lightning.pytorch", "lightning.fabric")
# Modules under a trusted root that do something when imported.
_NEVER_IMPORTED = ("focaldet.__main__", "focaldet.bench.__main__", "focaldet.cli", "focaldet.engine.lightning_cli")

# The public home of each recipe part: a recipe records a class by the path its users write.
PUBLIC_MODULES = ("focaldet.models", "focaldet.losses", "torch.optim", "torch.optim.lr_scheduler")

# Class paths earlier versions recorded (the module a class was defined in) -> the public path.
ALIASES = {
    "focaldet.modeling.anchors.AnchorGenerator": "focaldet.models.AnchorGenerator",
    "focaldet.modeling.backbone.ResNetBackbone": "focaldet.models.ResNetBackbone",
    "focaldet.modeling.box_coder.BoxCoder": "focaldet.models.BoxCoder",
    "focaldet.modeling.matcher.Matcher": "focaldet.models.Matcher",
    "focaldet.modeling.postprocess.PostProcess": "focaldet.models.PostProcess",
    "focaldet.modeling.retinanet.RetinaNet": "focaldet.models.RetinaNet",
    "focaldet.losses.box.SmoothL1Loss": "focaldet.losses.SmoothL1Loss",
    "focaldet.losses.box.L1Loss": "focaldet.losses.L1Loss",
    "focaldet.losses.box.GIoULoss": "focaldet.losses.GIoULoss",
    "focaldet.losses.box.DIoULoss": "focaldet.losses.DIoULoss",
    "focaldet.losses.box.CIoULoss": "focaldet.losses.CIoULoss",
    "focaldet.losses.focal.SigmoidFocalLoss": "focaldet.losses.SigmoidFocalLoss",
    "focaldet.losses.focal.BinaryCrossEntropyLoss": "focaldet.losses.BinaryCrossEntropyLoss",
    "focaldet.losses.focal.SoftmaxFocalLoss": "focaldet.losses.SoftmaxFocalLoss",
    "focaldet.losses.focal.PolyFocalLoss": "focaldet.losses.PolyFocalLoss",
    "focaldet.losses.focal.ProbabilityFocalLoss": "focaldet.losses.ProbabilityFocalLoss",
    "focaldet.losses.quality.QualityFocalLoss": "focaldet.losses.QualityFocalLoss",
    "focaldet.losses.quality.VarifocalLoss": "focaldet.losses.VarifocalLoss",
    "focaldet.losses.criterion.RetinaNetCriterion": "focaldet.losses.RetinaNetCriterion",
}


@functools.cache
def recipe_bases() -> dict[str, type]:
    """``RetinaNetModule`` argument -> the type a recipe's ``class_path`` there must subclass."""
    import torch

    from focaldet.losses import RetinaNetCriterion
    from focaldet.modeling import RetinaNet

    return {"model": RetinaNet, "criterion": RetinaNetCriterion, "optimizer": torch.optim.Optimizer,
            "lr_scheduler": torch.optim.lr_scheduler.LRScheduler}


# the module's arguments that take a class to call later (the recipe binds their arguments)
BOUND_ARGS = ("model", "optimizer", "lr_scheduler")


class UnsafeFileError(CheckpointError):
    """A user file asks to run code (a pickled global, a class outside the allow-list): a
    `CheckpointError` (a `WeightsError`) too, so callers that name a bad checkpoint name it."""


# ------------------------------------------------------------------ pickles

_GLOBAL_RE = re.compile(r"GLOBAL (\S+)")


def _refusal(e: Exception) -> str | None:
    """Why torch's weights-only unpickler refused a file (``None``: the file is just damaged)."""
    text = str(e)
    if "Weights only load failed" not in text or "Unsupported operand" in text:
        return None  # (an opcode it does not know: damage as often as malice; refused as corrupt)
    found = _GLOBAL_RE.search(text)
    if found:
        return f"it asks for {found.group(1)}, which a focaldet file never needs"
    detail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
    return f"its pickle holds something other than tensors and plain values ({(detail or ['?'])[0][:120]})"


def load_torch_file(source: str | os.PathLike | bytes, what: str, map_location: Any = "cpu",
                    mmap: bool = False) -> Any:
    """``torch.load(source, weights_only=True)`` with :data:`SAFE_GLOBALS` allowed; a pickle that
    asks for more raises :class:`UnsafeFileError`, a damaged file ``WeightsError``, both one
    line starting with ``what`` (e.g. ``"checkpoint runs/last.ckpt"``). ``source`` may be the
    bytes of a file (a payload inside an archive)."""
    import torch

    src = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(src, map_location=map_location, mmap=mmap, weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (zip), EOFError, ValueError, ...
        refused = _refusal(e)
        if refused:
            raise UnsafeFileError(f"{what}: refused to load: {refused} (focaldet loads files as weights only; "
                                  "see docs/security.md)") from None
        raise WeightsError(f"{what} is truncated or corrupt ({type(e).__name__}: {_detail(e)})") from None


def _detail(e: Exception) -> str:
    """The gist of a load error, without PyTorch's advice to turn ``weights_only`` off."""
    text = str(e)
    if "Weights only load failed" in text:
        parts = [p for p in re.split(r"\n\s*\n", text.split("WeightsUnpickler error:", 1)[-1])
                 if p.strip() and not p.lstrip().startswith(("Weights only load failed", "Check the documentation",
                                                              "Please file an issue"))]
        text = parts[0] if parts else "not a weights-only pickle"
    return " ".join(text.split())[:200] or type(e).__name__


# ------------------------------------------------------------------ class paths

def public_path(cls: type) -> str:
    """Where users import ``cls`` from: ``focaldet.models.X`` / ``focaldet.losses.Y`` when
    re-exported there, else its defining module."""
    import importlib

    for module in PUBLIC_MODULES:
        if getattr(importlib.import_module(module), cls.__name__, None) is cls:
            return f"{module}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _under(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r + ".") for r in roots)


def check_path(class_path: str, trust: bool = False) -> str:
    """``class_path`` (an alias mapped to its public path) if it may be imported: a dotted name
    of identifiers under :data:`TRUSTED_ROOTS` (anything with ``trust``); else ``ConfigError``."""
    path = ALIASES.get(str(class_path), str(class_path))
    parts = path.split(".")
    if len(parts) < 2 or not all(p.isidentifier() for p in parts):
        raise ConfigError(f"{class_path!r} is not a dotted class path")
    if trust:
        return path
    if not _under(path, TRUSTED_ROOTS) or _under(path, _NEVER_IMPORTED) or any(p.startswith("_") for p in parts):
        raise ConfigError(f"{class_path} is not a class focaldet builds from a file "
                          f"(only classes of {', '.join(TRUSTED_ROOTS)})")
    return path


def resolve_class(class_path: str, expected: type | None, trust: bool = False) -> type:
    """The class ``class_path`` names, after `check_path` and, once imported, the check that
    it is a class subclassing ``expected`` (``None``: no class is expected here, so only a
    trusted file may name one). ``ConfigError`` otherwise."""
    import importlib

    path = check_path(class_path, trust)
    if expected is None and not trust:
        raise ConfigError(f"{class_path}: no class is expected here")
    module_name, _, attr = path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"cannot import {class_path!r}: {e}") from None
    if not isinstance(obj, type):
        raise ConfigError(f"{class_path} is not a class")
    if expected is not None and not issubclass(obj, expected) and not trust:
        raise ConfigError(f"{class_path} is not a {expected.__module__}.{expected.__qualname__}")
    return obj


@contextlib.contextmanager
def import_policy(trust: bool = False):
    """While active, jsonargparse refuses (before importing) any ``class_path`` of a config or
    a command-line value outside :data:`CLI_IMPORT_ROOTS`; nothing changes with ``trust``."""
    try:
        from jsonargparse import _common
        from jsonargparse import set_parsing_settings
    except ImportError:  # pragma: no cover - an old jsonargparse: our own prescan still applies
        yield
        return
    if trust or "import_path_verdicts" not in _common.parsing_settings:
        yield
        return
    saved = {k: _common.parsing_settings[k] for k in ("import_path_verdicts", "import_paths_enforced")}
    set_parsing_settings(import_path_denylist=["*", *_NEVER_IMPORTED], import_path_allowlist=list(CLI_IMPORT_ROOTS))
    # the most specific entry wins: these stay denied under their allowed root
    _common.parsing_settings["import_path_verdicts"].update({m: False for m in _NEVER_IMPORTED})
    try:
        yield
    finally:
        _common.parsing_settings.update(saved)


def config_class_paths(tree: Any, where: str = "") -> list[tuple[str, str]]:
    """``(key, class_path)`` of every ``class_path`` in a parsed YAML tree."""
    found: list[tuple[str, str]] = []
    if isinstance(tree, dict):
        for key, value in tree.items():
            sub = f"{where}.{key}" if where else str(key)
            if key == "class_path" and isinstance(value, str):
                found.append((where, value))
            else:
                found += config_class_paths(value, sub)
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            found += config_class_paths(value, f"{where}[{i}]")
    return found


def check_config_file(path: str | os.PathLike, trust: bool = False) -> None:
    """A config whose ``class_path`` lies outside :data:`CLI_IMPORT_ROOTS` is refused in one line
    naming the file and the key, before anything is imported."""
    if trust:
        return
    import yaml

    try:
        tree = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return  # the parser says what is wrong with it
    for key, class_path in config_class_paths(tree):
        parts = str(class_path).split(".")
        if "." in class_path and (not _under(class_path, CLI_IMPORT_ROOTS) or _under(class_path, _NEVER_IMPORTED)
                                  or not all(p.isidentifier() for p in parts)):
            raise ConfigError(f"config {path}: {key}.class_path {class_path} is not a class focaldet imports from "
                              f"a config (only classes of {', '.join(CLI_IMPORT_ROOTS)}; see docs/security.md)")


# ------------------------------------------------------------------ .pt2 archives

_PT2_FILES = re.compile(r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|"
                        r"models/[\w.-]+\.json|extra/.+|data/weights/[\w.-]+|data/constants/[\w.-]+|"
                        r"data/sample_inputs/[\w.-]+\.pt)")


def check_pt2(path: str | os.PathLike, trust: bool = False) -> None:
    """Refuses (one line naming ``path``) a ``.pt2`` that ``torch.export.load`` could not read
    without running code from it: a pickled payload that needs more than weights-only
    unpickling (torch retries those with ``weights_only`` off), a pickled custom object,
    compiled code (AOTInductor), or any file outside the layout ``torch.export.save`` writes."""
    if trust:
        return
    what = f"exported program {path}"
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise WeightsError(f"{what}: no such file") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise WeightsError(f"{what}: not a torch.export archive ({e})") from None
    with archive:
        names = [n for n in archive.namelist() if not n.endswith("/")]
        for name in names:
            inner = name.split("/", 1)[1] if "/" in name else name  # below the archive's top folder
            if not _PT2_FILES.fullmatch(inner):
                raise UnsafeFileError(f"{what}: refused to load: it holds {inner}, which a torch.export program "
                                      "saved by focaldet never has (compiled code or another payload; "
                                      "see docs/security.md)")
        for name in names:
            inner = name.split("/", 1)[1] if "/" in name else name
            if inner.endswith(".pt"):  # sample inputs; legacy weights / constants files
                _weights_only_payload(archive.read(name), what, inner)
            elif inner.endswith("_config.json") and inner.startswith("data/"):
                _check_payloads(archive, name, inner, what)


def _check_payloads(archive: zipfile.ZipFile, name: str, inner: str, what: str) -> None:
    try:
        config = json.loads(archive.read(name)).get("config", {})
    except (ValueError, AttributeError):
        raise WeightsError(f"{what}: {inner} is not valid JSON") from None
    folder = name.rsplit("/", 1)[0]
    for fqn, meta in config.items():
        file = str(meta.get("path_name", ""))
        if file.startswith(("custom_obj", "opaque_obj")) or (meta.get("use_pickle") and not file):
            raise UnsafeFileError(f"{what}: refused to load: its {fqn} is a pickled object, which only runs "
                                  "as code (see docs/security.md)")
        if meta.get("use_pickle"):
            try:
                data = archive.read(f"{folder}/{file}")
            except KeyError:
                raise WeightsError(f"{what}: {inner} names {file}, which the archive lacks") from None
            _weights_only_payload(data, what, fqn)


def _weights_only_payload(data: bytes, what: str, name: str) -> None:
    """A payload torch.export.load would unpickle: it must load as weights only (torch would
    retry a failure with ``weights_only`` off, running the pickle)."""
    try:
        load_torch_file(data, f"{what} ({name})")
    except UnsafeFileError:
        raise
    except WeightsError as e:
        detail = str(e).split("(", 2)[-1].rstrip(")")
        raise UnsafeFileError(f"{what}: refused to load: its {name} does not load as weights only ({detail}), "
                              "and torch.export.load would unpickle it in full (see docs/security.md)") from None
