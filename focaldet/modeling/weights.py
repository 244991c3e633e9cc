"""Starting from pretrained weights: read a file, map its names, copy what fits, say what did not.

``init_weights(model, source)`` copies into ``model`` every tensor of ``source`` whose
(mapped) name and shape match, and returns a `LoadReport` (``init_weights: loaded N of M
tensors from SOURCE``, then every skipped tensor with both shapes, and what was
re-initialised). ``source`` is

* a focaldet checkpoint (any class count), or a state dict saved from a focaldet model;
* a torchvision ``retinanet_resnet50_fpn`` (v1) or ``retinanet_resnet50_fpn_v2`` state dict,
  e.g. torchvision's COCO file ``retinanet_resnet50_fpn_coco-eeacb38b.pth``: rebuilt as a
  torchvision model and converted with ``RetinaNet.from_torchvision`` (the name mapping of
  ``focaldet.modeling.interop``);
* a torchvision ResNet (classification) state dict, for the backbone;
* a torchvision weights name such as ``"RetinaNet_ResNet50_FPN_Weights.COCO_V1"``,
  downloaded by torchvision (online) only then.

Prefixes are handled: Lightning's ``state_dict`` wrapper, ``module.`` (DDP), ``model.``,
``_orig_mod.`` (torch.compile), ``backbone.body.`` (torchvision's backbone-with-FPN).
A class-logit layer of another class (or anchor) count is re-initialised as a new one
(N(0, 0.01), the prior bias). It refuses, with a one-line `WeightsError`, a file that is
not a state dict or checkpoint, and a load in which less than half of the backbone's
tensors match: a wrong file never silently leaves a randomly initialised model.
"""

from __future__ import annotations

import os
import re
from functools import partial
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from focaldet.errors import WeightsError

__all__ = ["LoadReport", "init_weights", "load_matching", "print_report", "read_source", "read_weights_file"]

_PREFIXES = ("module.", "model.", "_orig_mod.")
_SKIP = ("num_batches_tracked",)  # BatchNorm's step counter: not a weight, never counted
_CLS_LOGITS = "head.cls_logits."
_BOX_PRED = "head.bbox_pred."


def not_torch_save_reason(path: Path) -> str | None:
    """Why ``path`` cannot be a ``torch.save`` file (a zip archive, or a legacy pickle), from
    its first bytes; ``None`` when it may be one. Spares users PyTorch's ``weights_only``
    advice for a file that is something else entirely."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if not magic:
        return "empty file (0 bytes)"
    if magic.startswith(b"PK") or magic[:1] == b"\x80":
        return None
    return f"not a readable PyTorch file (neither a zip archive nor a pickle: it starts with {magic!r})"


def read_weights_file(path: str | os.PathLike, what: str = "weights file", map_location: Any = "cpu",
                      mmap: bool = False) -> Any:
    """``torch.load`` of a checkpoint or state dict file (default on the CPU), tensors only; a
    missing, foreign or damaged file is one ``WeightsError`` naming ``what`` and the path."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"{what} {path}: file not found")
    reason = not_torch_save_reason(path)
    if reason:
        raise WeightsError(f"{what} {path}: {reason}")
    from focaldet.config.safe_load import UnsafeFileError, load_torch_file

    try:
        return load_torch_file(path, f"{what} {path}", map_location=map_location, mmap=mmap)
    except UnsafeFileError:
        raise
    except WeightsError as e:  # truncated zip, damaged pickle, ...
        raise WeightsError(f"{what} {path}: not a readable PyTorch file ({str(e).split(' (', 1)[-1]}") from None


@dataclass
class LoadReport:
    """What ``load_matching`` copied. Names are the target model's."""

    source: str
    total: int  # tensors of the target (BatchNorm step counters left out)
    loaded: list[str] = field(default_factory=list)
    skipped: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (name, source shape, target shape)
    missing: list[str] = field(default_factory=list)  # target tensors the source lacks
    unexpected: list[str] = field(default_factory=list)  # source tensors the target lacks
    reinitialised: list[str] = field(default_factory=list)
    backbone_loaded: int = 0
    backbone_total: int = 0

    def summary(self, what: str = "init_weights") -> str:
        lines = [f"{what}: loaded {len(self.loaded)} of {self.total} tensors from {self.source}"]
        lines += [f"  skipped {n}: source {list(s)} vs model {list(t)}" for n, s, t in self.skipped]
        lines += [f"  re-initialised {r}" for r in self.reinitialised]
        for label, names in (("not in the source", self.missing), ("not in the model", self.unexpected)):
            if names:
                shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
                lines.append(f"  {label}: {shown}")
        return "\n".join(lines)


def print_report(report: LoadReport, what: str = "init_weights") -> None:
    """Print the report once: on the global rank 0 process only (Lightning's rank)."""
    from lightning.pytorch.utilities import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) == 0:
        print(report.summary(what), flush=True)


def _tensor_dict(obj: Any) -> dict[str, Tensor] | None:
    if isinstance(obj, Mapping) and obj and all(isinstance(k, str) for k in obj) and \
            all(isinstance(v, Tensor) for v in obj.values()):
        return dict(obj)
    return None


def _unwrap(obj: Any, source: str) -> dict[str, Tensor]:
    """The state dict inside a Lightning / detectron2 / torchvision-references checkpoint."""
    for key in (None, "state_dict", "model", "model_state_dict", "module"):
        inner = obj if key is None else (obj.get(key) if isinstance(obj, Mapping) else None)
        state = _tensor_dict(inner)
        if state is not None:
            if key == "state_dict":  # a focaldet/Lightning checkpoint: the model, not the criterion
                state = {k: v for k, v in state.items() if not k.startswith("criterion.")}
            return state
    raise WeightsError(f"{source}: not a state dict or checkpoint (no mapping of names to tensors found)")


def _strip(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    if name.startswith("backbone.body."):
        name = "backbone." + name[len("backbone.body."):]
    return name


def _is_torchvision_retinanet(state: Mapping[str, Tensor]) -> bool:
    return any(k.startswith("head.classification_head.") for k in state) and \
        any(k.startswith("backbone.body.") for k in state)


def _from_torchvision_retinanet(state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """A torchvision RetinaNet state dict, in focaldet names: the torchvision model is built
    (v1 or v2 from the file's layout), loaded strictly, and converted by ``from_torchvision``."""
    from torchvision.models import resnet50
    from torchvision.models.detection import retinanet as tvr
    from torchvision.ops import FrozenBatchNorm2d
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    from focaldet.modeling.retinanet import RetinaNet

    try:
        rows_cls = state["head.classification_head.cls_logits.weight"].shape[0]
        rows_box = state["head.regression_head.bbox_reg.weight"].shape[0]
    except KeyError as e:
        raise WeightsError(f"{source}: a torchvision RetinaNet state dict without {e}") from None
    num_anchors = rows_box // 4
    if num_anchors != 9 or rows_cls % num_anchors:
        raise WeightsError(f"{source}: a torchvision RetinaNet with {rows_box // 4} anchors per location; "
                           "only the 9 of retinanet_resnet50_fpn are supported")
    num_classes = rows_cls // num_anchors
    v2 = any(re.match(r"head\.classification_head\.conv\.\d+\.1\.weight", k) for k in state)  # GroupNorm in the head
    body = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    # torchvision's builders: v1 takes P6 from P5 (LastLevelP6P7(256, 256)); v2 from C5, GroupNorm heads
    p6 = LastLevelP6P7(2048, 256) if v2 else LastLevelP6P7(256, 256)
    backbone = tvr._resnet_fpn_extractor(body, 5, returned_layers=[2, 3, 4], extra_blocks=p6)
    head = tvr.RetinaNetHead(backbone.out_channels, num_anchors, num_classes,
                             norm_layer=partial(nn.GroupNorm, 32) if v2 else None)
    tv = tvr.RetinaNet(backbone, num_classes, anchor_generator=tvr._default_anchorgen(), head=head)
    try:
        tv.load_state_dict(state)
    except RuntimeError as e:
        first = " ".join(str(e).strip().splitlines()[:2])[:300]
        raise WeightsError(f"{source}: not a torchvision retinanet_resnet50_fpn{'_v2' if v2 else ''} state dict "
                           f"({first})") from None
    return RetinaNet.from_torchvision(tv, channels_last=False).state_dict()


def read_source(source: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of ``source`` in focaldet's names (see the module docstring)."""
    text = str(source)
    path = Path(text).expanduser()
    if path.exists() or path.suffix in (".pth", ".pt", ".ckpt", ".bin", ".pkl"):
        state = _unwrap(read_weights_file(path), text)
    else:
        state = _download(text)
    if _is_torchvision_retinanet(state):
        return _from_torchvision_retinanet(state, text)
    return {_strip(k): v for k, v in state.items()}


def _download(name: str) -> dict[str, Tensor]:
    """torchvision's weights ``name`` (e.g. ``RetinaNet_ResNet50_FPN_Weights.COCO_V1``), downloaded."""
    import torchvision

    try:
        weights = torchvision.models.get_weight(name)
    except (KeyError, ValueError, AttributeError):
        raise WeightsError(f"init_weights {name!r}: neither a file nor a torchvision weights name "
                           "(such as RetinaNet_ResNet50_FPN_Weights.COCO_V1)") from None
    try:
        return dict(weights.get_state_dict(progress=True))
    except Exception as e:  # offline, proxy, disk full
        raise WeightsError(f"init_weights {name}: torchvision could not download it ({e})") from None


def _target_name(name: str, targets: Mapping[str, Tensor]) -> str | None:
    """The target tensor a source name lands on: as is, or with the backbone prefix added
    (a ResNet file into a whole model) or removed (a model file into a backbone)."""
    for candidate in (name, "backbone." + name, name[len("backbone."):] if name.startswith("backbone.") else None):
        if candidate is not None and candidate in targets:
            return candidate
    return None


@torch.no_grad()
def load_matching(model: nn.Module, state: Mapping[str, Tensor], source: str,
                  backbone_prefix: str = "backbone.") -> LoadReport:
    """Copy every tensor of ``state`` whose name (`_target_name`) and shape match ``model``'s.

    Parameters keep their ``requires_grad`` (a frozen layer stays frozen). ``head.cls_logits``
    / ``head.bbox_pred`` of another shape are re-initialised; fewer than half of the
    backbone's tensors loaded raises `WeightsError` (``backbone_prefix=""``: the model is a
    backbone).
    """
    targets = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.endswith(_SKIP)}
    report = LoadReport(source, len(targets))
    seen = set()
    for name, value in state.items():
        if name.endswith(_SKIP):
            continue
        target = _target_name(name, targets)
        if target is None:
            report.unexpected.append(name)
            continue
        seen.add(target)
        dst = targets[target]
        if tuple(value.shape) != tuple(dst.shape):
            report.skipped.append((target, tuple(value.shape), tuple(dst.shape)))
            continue
        dst.data.copy_(value.to(dtype=dst.dtype))
        report.loaded.append(target)
    report.missing = [k for k in targets if k not in seen]
    head = getattr(model, "head", None)
    skipped = {n for n, _, _ in report.skipped}
    if head is not None and any(n.startswith(_CLS_LOGITS) for n in skipped):
        head.reset_cls_logits()
        report.reinitialised.append(f"head.cls_logits: N(0, 0.01), bias = prior {head.cls_logits.bias[0].item():.4f}")
    if head is not None and any(n.startswith(_BOX_PRED) for n in skipped):
        nn.init.normal_(head.bbox_pred.weight, std=0.01)
        nn.init.zeros_(head.bbox_pred.bias)
        report.reinitialised.append("head.bbox_pred: N(0, 0.01), bias 0")
    backbone = [k for k in targets if k.startswith(backbone_prefix)]
    report.backbone_total = len(backbone)
    report.backbone_loaded = sum(1 for k in report.loaded if k.startswith(backbone_prefix))
    if report.backbone_total and 2 * report.backbone_loaded < report.backbone_total:
        raise WeightsError(f"{source}: only {report.backbone_loaded} of the backbone's {report.backbone_total} "
                           "tensors match this model (wrong file or architecture?); refusing to train from "
                           "random weights")
    return report


def init_weights(model: nn.Module, source: str | os.PathLike) -> LoadReport:
    """``load_matching(model, read_source(source))`` for a ``RetinaNet``; a head with norm
    layers (torchvision's v2) into one without, or the other way round, is refused."""
    state = read_source(source)
    source_gn = any(re.match(r"head\.(cls|box)_tower\.\d+\.weight$", k) and v.ndim == 1 for k, v in state.items())
    model_gn = any(isinstance(m, nn.GroupNorm) for m in model.head.modules()) if hasattr(model, "head") else source_gn
    if any(k.startswith("head.") for k in state) and source_gn != model_gn:
        raise WeightsError(
            f"{source}: its head {'has' if source_gn else 'has no'} GroupNorm layers and this model's "
            f"{'has none' if source_gn else 'has'}: for torchvision's retinanet_resnet50_fpn_v2 set "
            "model.model.head_norm: gn and model.model.p6_from: c5; for v1, head_norm: null and p6_from: p5")
    return load_matching(model, state, str(source))
