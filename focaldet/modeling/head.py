"""RetinaNet's class and box subnets, shared across pyramid levels."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from focaldet.errors import ConfigError


def prior_bias(prior_prob: float) -> float:
    """``b = -log((1 - pi) / pi)``: the class-logit bias that makes every anchor's initial
    foreground probability ``pi`` (paper Sec. 4.1), so the abundant background cannot
    swamp the first iterations."""
    return -math.log((1 - prior_prob) / prior_prob)


def _tower(channels: int, num_convs: int, norm: str | None) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers.append(nn.Conv2d(channels, channels, 3, padding=1, bias=norm is None))
        if norm == "gn":
            layers.append(nn.GroupNorm(32, channels))
        elif norm is not None:
            raise ConfigError(f"head norm must be None or 'gn', got {norm!r}")
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class RetinaNetHead(nn.Module):
    """Class subnet (``num_convs`` x conv3x3-ReLU, then ``A*C`` logits) and box subnet
    (same tower, then ``A*4`` deltas), applied to every level with shared weights.

    Args:
        in_channels: channels of the pyramid features.
        num_anchors: anchors per location ``A``.
        num_logits: class logits per anchor ``C``: ``K``, or ``K + 1`` for a loss that
            needs a background logit (its last channel).
        num_convs: depth of each tower.
        norm: ``None`` (paper) or ``"gn"`` (GroupNorm(32), shared across levels).
        prior_prob: initial foreground probability ``pi`` of every anchor and class.
    """

    def __init__(self, in_channels: int, num_anchors: int, num_logits: int, num_convs: int = 4,
                 norm: str | None = None, prior_prob: float = 0.01, background_logit: bool = False):
        super().__init__()
        self.num_anchors, self.num_logits = num_anchors, num_logits
        self.cls_tower = _tower(in_channels, num_convs, norm)
        self.box_tower = _tower(in_channels, num_convs, norm)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors * num_logits, 3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 3, padding=1)
        self.prior_prob, self.background_logit = prior_prob, background_logit
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # paper: gaussian sigma = 0.01, bias 0
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.reset_cls_logits()

    @torch.no_grad()
    def reset_cls_logits(self) -> None:
        """The class-logit layer as at construction: weights N(0, 0.01), bias the prior
        (also used by ``init_weights`` when a loaded file has another class or anchor count)."""
        nn.init.normal_(self.cls_logits.weight, std=0.01)
        bias = self.cls_logits.bias.view(self.num_anchors, self.num_logits)  # (A*C,) -> (A, C)
        if self.background_logit:
            # Softmax over K fg + 1 bg logits: fg logits 0 and bg logit log(1/pi - K) give
            # every foreground class probability pi, like the sigmoid prior.
            bias.zero_()
            bias[:, -1] = math.log(max(1 / self.prior_prob - (self.num_logits - 1), 1.0))
        else:
            bias.fill_(prior_bias(self.prior_prob))

    def forward(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """``[(N, Cin, Hi, Wi), ...]`` -> class logits ``[(N, Hi*Wi*A, C), ...]`` and box
        deltas ``[(N, Hi*Wi*A, 4), ...]``, anchor order ``(Hi, Wi, A)`` as the anchors."""
        cls_out, box_out = [], []
        for x in features:
            n, _, h, w = x.shape
            logits = self.cls_logits(self.cls_tower(x))  # (N, A*C, H, W)
            deltas = self.bbox_pred(self.box_tower(x))  # (N, A*4, H, W)
            # (N, A*C, H, W) -> (N, H, W, A*C) -> (N, H*W*A, C); a view under channels_last
            cls_out.append(logits.permute(0, 2, 3, 1).reshape(n, h * w * self.num_anchors, self.num_logits))
            box_out.append(deltas.permute(0, 2, 3, 1).reshape(n, h * w * self.num_anchors, 4))
        return cls_out, box_out
