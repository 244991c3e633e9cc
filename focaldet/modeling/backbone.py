"""ResNet backbone returning C3, C4, C5 (strides 8, 16, 32)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision import ops

from focaldet.errors import ConfigError

RESNET_OUT_CHANNELS = {18: (128, 256, 512), 34: (128, 256, 512), 50: (512, 1024, 2048), 101: (512, 1024, 2048)}
NORMS = ("frozen_bn", "bn", "gn")


class FrozenBatchNorm2d(ops.FrozenBatchNorm2d):
    """``torchvision.ops.FrozenBatchNorm2d`` (same state dict) that runs as one fused
    ``F.batch_norm`` when no gradient flows through it, as detectron2's: at inference this
    is one pass over the activations instead of a multiply and an add. With a gradient it
    is torchvision's ``x * scale + bias`` (``F.batch_norm``'s backward would also compute
    the frozen weights' gradients)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.requires_grad:
            return super().forward(x)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def fuse_frozen_batchnorm(module: nn.Module) -> int:
    """Fold every `FrozenBatchNorm2d` that directly follows a ``Conv2d`` into that
    convolution, in place, and return how many were folded.

    ``bn(conv(x)) = conv'(x)`` with ``W' = W * s`` and ``b' = (b - mean) * s + beta``,
    ``s = gamma / sqrt(var + eps)`` (``torch.nn.utils.fusion.fuse_conv_bn_weights``): one
    pass over the activations fewer per convolution, the same outputs to float rounding.
    The pairs are torchvision ResNet's ``convK``/``bnK`` attributes and ``(Conv2d,
    FrozenBatchNorm2d)`` neighbours in a ``Sequential`` (the downsample branch); each folded
    norm becomes ``nn.Identity``. For inference: the state dict changes (convolutions gain
    biases, the norms' buffers go), so load weights before fusing.
    """
    folded = 0
    for parent in list(module.modules()):
        children = dict(parent.named_children())
        names = list(children)
        pairs = [(f"conv{name[2:]}", name) for name in names if name.startswith("bn")]
        pairs += list(zip(names, names[1:])) if isinstance(parent, nn.Sequential) else []
        for conv_name, bn_name in dict.fromkeys(pairs):  # a pair both rules find is folded once
            conv, bn = children.get(conv_name), children[bn_name]
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, ops.FrozenBatchNorm2d)):
                continue
            with torch.no_grad():
                weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                                    bn.eps, bn.weight, bn.bias)
            bias.requires_grad_(weight.requires_grad)  # frozen layers stay frozen
            conv.weight, conv.bias = weight, bias
            setattr(parent, bn_name, nn.Identity())
            folded += 1
    return folded


def _norm_layer(norm: str):
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "gn":
        return lambda c: nn.GroupNorm(32, c)
    raise ConfigError(f"backbone norm must be one of {NORMS}, got {norm!r}")


class ResNetBackbone(nn.Module):
    """torchvision ResNet without its classifier, returning ``[C3, C4, C5]``.

    Args:
        depth: 18, 34, 50 or 101.
        norm: ``"frozen_bn"`` (statistics and affine frozen, as detectron2 with pretrained
            weights), ``"bn"`` (trainable BatchNorm; ``--trainer.sync_batchnorm true`` makes
            it SyncBN under DDP) or ``"gn"`` (GroupNorm(32), for training from scratch).
        freeze_at: freeze the stem (1) and also stage 1 (2, the default as detectron2) ...
            up to 5 (everything); 0 trains everything.
        weights: ``None`` (random init), a path to a ``state_dict`` file of a torchvision
            ResNet (loaded with ``weights_only=True``), or a torchvision weights enum name
            such as ``"ResNet50_Weights.IMAGENET1K_V1"`` (downloaded by torchvision: online only).
    """

    def __init__(self, depth: int = 50, norm: str = "frozen_bn", freeze_at: int = 2, weights: str | None = None):
        super().__init__()
        if depth not in RESNET_OUT_CHANNELS:
            raise ConfigError(f"ResNet depth must be one of {sorted(RESNET_OUT_CHANNELS)}, got {depth}")
        if not 0 <= freeze_at <= 5:
            raise ConfigError(f"freeze_at must be in 0..5, got {freeze_at}")
        self.depth, self.norm, self.freeze_at, self.weights = depth, norm, freeze_at, weights  # the recipe
        net = getattr(torchvision.models, f"resnet{depth}")(weights=None, norm_layer=_norm_layer(norm))
        if weights is not None:
            net.load_state_dict(_load_resnet_weights(weights, depth), strict=False)
        # Same attribute names as torchvision's ResNet, so its state dicts load as they are.
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.out_channels = RESNET_OUT_CHANNELS[depth]
        stages = [[self.conv1, self.bn1], self.layer1, self.layer2, self.layer3, self.layer4]
        for stage in stages[:freeze_at]:
            for module in stage:
                for p in module.parameters():
                    p.requires_grad_(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        """``x (N, 3, H, W)`` -> ``[C3 (N, c3, H/8, W/8), C4 (.., H/16, ..), C5 (.., H/32, ..)]``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c3, c4, c5]


def _load_resnet_weights(weights: str, depth: int) -> dict[str, Tensor]:
    """A torchvision ResNet state dict from a file path or a weights enum name."""
    path = Path(weights).expanduser()
    if path.suffix in (".pth", ".pt", ".bin", ".ckpt") or path.exists():
        if not path.is_file():
            raise ConfigError(f"backbone weights file not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        return {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:  # e.g. "ResNet50_Weights.IMAGENET1K_V1" or "IMAGENET1K_V1"
        enum = torchvision.models.get_model_weights(f"resnet{depth}")
        member = enum[weights.split(".")[-1]]
    except (KeyError, ValueError) as e:
        raise ConfigError(f"backbone weights {weights!r} is neither a file nor a torchvision weights name") from e
    state = member.get_state_dict(progress=True)
    return {k: v for k, v in state.items() if not k.startswith("fc.")}
