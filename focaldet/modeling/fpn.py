"""Feature pyramid network with the extra RetinaNet levels P6 and P7."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from focaldet.errors import ConfigError


def _c2_xavier_fill(conv: nn.Conv2d) -> nn.Conv2d:
    """Caffe2's XavierFill, as detectron2 and torchvision initialise FPN convs."""
    nn.init.kaiming_uniform_(conv.weight, a=1)
    nn.init.zeros_(conv.bias)
    return conv


class FPN(nn.Module):
    """P3-P5 from C3-C5 by lateral 1x1 convs and a nearest-neighbour top-down path, then
    P6 = conv3x3/2 of C5 (paper, detectron2) or of P5 (torchvision v1), P7 = conv3x3/2(ReLU(P6)).

    Args:
        in_channels: channels of C3, C4, C5.
        out_channels: channels of every P level.
        p6_from: ``"c5"`` or ``"p5"``.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256, p6_from: str = "c5"):
        super().__init__()
        if p6_from not in ("c5", "p5"):
            raise ConfigError(f"p6_from must be 'c5' or 'p5', got {p6_from!r}")
        self.p6_from = p6_from
        self.out_channels = out_channels
        self.lateral = nn.ModuleList(_c2_xavier_fill(nn.Conv2d(c, out_channels, 1)) for c in in_channels)
        self.output = nn.ModuleList(_c2_xavier_fill(nn.Conv2d(out_channels, out_channels, 3, padding=1)) for _ in in_channels)
        p6_in = in_channels[-1] if p6_from == "c5" else out_channels
        self.p6 = _c2_xavier_fill(nn.Conv2d(p6_in, out_channels, 3, stride=2, padding=1))
        self.p7 = _c2_xavier_fill(nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1))

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """``[C3, C4, C5]`` -> ``[P3, ..., P7]``, each ``(N, out_channels, Hi, Wi)``."""
        inner = self.lateral[-1](features[-1])
        outs = [self.output[-1](inner)]
        for i in range(len(features) - 2, -1, -1):
            lateral = self.lateral[i](features[i])
            inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
            outs.insert(0, self.output[i](inner))
        p6 = self.p6(features[-1] if self.p6_from == "c5" else outs[-1])
        p7 = self.p7(F.relu(p6))
        return outs + [p6, p7]
