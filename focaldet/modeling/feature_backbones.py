"""Backbones beyond ResNet: any torchvision classifier (``TorchvisionBackbone``, through
``torchvision.models.feature_extraction``) or any timm model (``TimmBackbone``, through
``features_only=True``; timm is the optional extra ``focaldet[timm]``).

Both return ``[C3, C4, C5]`` (strides 8, 16, 32) with ``out_channels`` discovered by running
a small dummy image once at construction, and take ``ResNetBackbone``'s options:

* ``norm``: what the BatchNorm layers become: ``"bn"`` (kept, trainable), ``"frozen_bn"``
  (``FrozenBatchNorm2d`` with the loaded statistics, for pretrained weights) or ``"gn"``
  (``GroupNorm(gcd(32, C), C)``, for training from scratch). Models without BatchNorm
  (ConvNeXt: LayerNorm) are left as they are.
* ``freeze_at``: as ``ResNetBackbone``: 1 freezes the stem (everything at stride <= 2), 2 also
  everything at stride 4, 3 also C3 (stride 8), 4 also C4, 5 everything; 0 trains everything.
* ``weights``: ``None`` (random init); a file (a state dict of the classifier, or a focaldet
  checkpoint whose backbone is this one), copied by name and shape with the load report of
  `focaldet.modeling.weights`; or the library's own name (torchvision: a weights enum such
  as ``"MobileNet_V3_Large_Weights.IMAGENET1K_V1"``; timm: ``"pretrained"``), downloaded:
  online only, and only when asked for.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from focaldet.errors import ConfigError, WeightsError
from focaldet.modeling.backbone import NORMS, FrozenBatchNorm2d
from focaldet.modeling.weights import load_matching, print_report, read_source

__all__ = ["TimmBackbone", "TorchvisionBackbone"]

STRIDES = (8, 16, 32)  # C3, C4, C5
_PROBE = 64  # side of the dummy image that discovers strides and channels (divisible by 32)
_HEAD_NAMES = ("classifier", "fc", "avgpool", "head", "global_pool")


def _replace_norms(module: nn.Module, norm: str) -> None:
    """Every ``nn.BatchNorm2d`` of ``module`` -> ``norm``'s layer, in place (the frozen one
    keeps the current statistics and affine parameters)."""
    if norm not in NORMS:
        raise ConfigError(f"backbone norm must be one of {NORMS}, got {norm!r}")
    if norm == "bn":
        return
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.BatchNorm2d):
                continue
            c = child.num_features
            if norm == "gn":
                new: nn.Module = nn.GroupNorm(math.gcd(32, c), c, eps=child.eps)
            else:
                new = FrozenBatchNorm2d(c, eps=child.eps)
                with torch.no_grad():
                    new.weight.copy_(child.weight)
                    new.bias.copy_(child.bias)
                    new.running_mean.copy_(child.running_mean)
                    new.running_var.copy_(child.running_var)
            setattr(parent, name, new)


def _stage_strides(net: nn.Module, forward) -> list[tuple[str, int, int]]:
    """``[(module name, stride, channels)]`` of ``net``'s stages, in the order they run, for a
    ``_PROBE``-px dummy image: its top-level modules, a ``Sequential``/``ModuleList`` among
    them (``features``, ``blocks``, ``trunk_output``) replaced by its children."""
    names = []
    for name, child in net.named_children():
        if name in _HEAD_NAMES:
            continue
        if isinstance(child, (nn.Sequential, nn.ModuleList)):
            names += [f"{name}.{n}" for n, _ in child.named_children()]
        else:
            names.append(name)
    seen: list[tuple[str, int, int]] = []
    hooks = []
    modules = dict(net.named_modules())
    for name in names:
        def hook(_m, _i, out, name=name):
            if isinstance(out, Tensor) and out.ndim == 4 and name not in [s[0] for s in seen]:
                seen.append((name, _PROBE // out.shape[-2], out.shape[1]))
        hooks.append(modules[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            forward(torch.zeros(1, 3, _PROBE, _PROBE))
    finally:
        for h in hooks:
            h.remove()
    return seen


def _freeze(net: nn.Module, stages: list[tuple[str, int, int]], freeze_at: int) -> None:
    """``requires_grad_(False)`` for the modules at stride <= 2**freeze_at (all of them at 5)."""
    if not 0 <= freeze_at <= 5:
        raise ConfigError(f"freeze_at must be in 0..5, got {freeze_at}")
    if freeze_at == 0:
        return
    modules = dict(net.named_modules())
    frozen = [n for n, stride, _ in stages if freeze_at == 5 or stride <= 2 ** freeze_at]
    if freeze_at == 5:
        frozen = [""]
    for name in frozen:
        for p in (modules[name].parameters() if name in modules else ()):
            p.requires_grad_(False)


def _load_file_weights(backbone: nn.Module, weights: str, prefix: str) -> None:
    """A classifier state dict (names as the library's model) or a focaldet checkpoint into
    ``backbone`` (whose library model sits under ``prefix``), with the load report."""
    state = read_source(weights)
    if any(k.startswith("backbone." + prefix) for k in state):  # a focaldet detector: its backbone
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    else:
        state = {prefix + k: v for k, v in state.items()}
    print_report(load_matching(backbone, state, weights, backbone_prefix=""), "backbone weights")


def _is_file(weights: str) -> bool:
    path = Path(weights).expanduser()
    return path.exists() or path.suffix in (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


class TorchvisionBackbone(nn.Module):
    """A torchvision classification model (``torchvision.models.<name>``) as a detection
    backbone: ``create_feature_extractor`` returns the last module output at stride 8, 16
    and 32 of its top two module levels (e.g. ``features.6/12/16`` of ``mobilenet_v3_large``,
    ``trunk_output.block2/3/4`` of RegNet).

    Args:
        name: a torchvision classifier, e.g. ``mobilenet_v3_large``, ``efficientnet_b0``,
            ``convnext_tiny``, ``regnet_y_800mf``, ``resnet18``.
        norm, freeze_at, weights: see the module docstring.
    """

    def __init__(self, name: str = "mobilenet_v3_large", norm: str = "bn", freeze_at: int = 0,
                 weights: str | None = None):
        super().__init__()
        import torchvision
        from torchvision.models.feature_extraction import create_feature_extractor

        self.name, self.norm, self.freeze_at, self.weights = name, norm, freeze_at, weights  # the recipe
        if name not in torchvision.models.list_models(torchvision.models):
            raise ConfigError(f"TorchvisionBackbone: {name!r} is not a torchvision classification model "
                              f"(torchvision.models.list_models(torchvision.models) lists them)")
        net = torchvision.models.get_model(name, weights=None)
        if weights is not None and not _is_file(weights):
            net.load_state_dict(_download_torchvision(name, weights))
        stages = _stage_strides(net, net)
        nodes = {}
        for stride in STRIDES:
            at = [s for s in stages if s[1] == stride]
            if not at:
                raise ConfigError(f"TorchvisionBackbone {name}: no module output at stride {stride} "
                                  f"(found strides {sorted({s[1] for s in stages})})")
            nodes[at[-1][0]] = f"c{int(math.log2(stride))}"
        self.return_nodes = list(nodes)
        self.net = create_feature_extractor(net, return_nodes=nodes)
        self.out_channels = tuple(next(s[2] for s in stages if s[0] == n) for n in self.return_nodes)
        if weights is not None and _is_file(weights):
            _load_file_weights(self, weights, "net.")
        _replace_norms(self.net, norm)
        _freeze(self.net, stages, freeze_at)

    def forward(self, x: Tensor) -> list[Tensor]:
        """``x (N, 3, H, W)`` -> ``[C3 (N, c3, H/8, W/8), C4 (.., H/16, ..), C5 (.., H/32, ..)]``."""
        out = self.net(x)
        return [out["c3"], out["c4"], out["c5"]]


def _download_torchvision(name: str, weights: str) -> dict[str, Tensor]:
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(name)
        member = enum[weights.split(".")[-1]]
    except (KeyError, ValueError) as e:
        raise ConfigError(f"backbone weights {weights!r} is neither a file nor a torchvision weights name "
                          f"of {name}") from e
    try:
        return dict(member.get_state_dict(progress=True))
    except Exception as e:  # offline
        raise WeightsError(f"backbone weights {weights}: torchvision could not download them ({e})") from None


class TimmBackbone(nn.Module):
    """Any timm model created with ``features_only=True``: the last feature map at each of
    strides 8, 16 and 32 (``feature_info.reduction()``), channels from ``feature_info``.

    Args:
        name: a timm model name, e.g. ``resnet18``, ``efficientnet_b0``, ``convnext_atto``.
        norm, freeze_at: see the module docstring.
        weights: a file, or ``"pretrained"`` for timm's own weights (downloaded: online only).
    """

    def __init__(self, name: str = "efficientnet_b0", norm: str = "bn", freeze_at: int = 0,
                 weights: str | None = None):
        super().__init__()
        try:
            import timm
        except ImportError:
            raise ConfigError("TimmBackbone needs timm: pip install 'focaldet[timm]'") from None
        self.name, self.norm, self.freeze_at, self.weights = name, norm, freeze_at, weights  # the recipe
        pretrained = weights == "pretrained"
        try:
            probe = timm.create_model(name, features_only=True, pretrained=False)
        except (RuntimeError, ValueError) as e:  # unknown model, or one without features_only
            raise ConfigError(f"TimmBackbone: {name!r}: {e}") from None
        reductions = probe.feature_info.reduction()
        indices = []
        for stride in STRIDES:
            at = [i for i, r in enumerate(reductions) if r == stride]
            if not at:
                raise ConfigError(f"TimmBackbone {name}: no feature map at stride {stride} (has {reductions})")
            indices.append(at[-1])
        try:
            self.net = timm.create_model(name, features_only=True, out_indices=indices, pretrained=pretrained)
        except Exception as e:  # offline
            raise WeightsError(f"backbone weights of timm {name}: could not create/download them ({e})") from None
        self.out_channels = tuple(self.net.feature_info.channels())
        if weights is not None and not pretrained:
            if not _is_file(weights):
                raise ConfigError(f"TimmBackbone weights {weights!r}: neither a file nor 'pretrained'")
            _load_file_weights(self, weights, "net.")
        stages = _stage_strides(self.net, self.net)
        _replace_norms(self.net, norm)
        _freeze(self.net, stages, freeze_at)

    def forward(self, x: Tensor) -> list[Tensor]:
        """``x (N, 3, H, W)`` -> ``[C3 (N, c3, H/8, W/8), C4 (.., H/16, ..), C5 (.., H/32, ..)]``."""
        return list(self.net(x))
