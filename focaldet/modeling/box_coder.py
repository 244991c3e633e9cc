"""Paired, pure box encode/decode (R-CNN parameterisation).

``encode(anchors, boxes)`` gives the regression targets ``(dx, dy, dw, dh)`` that
``decode(deltas, anchors)`` turns back into the same boxes. Decoding runs in fp32 whatever
the dtype of the network output (under AMP a half-precision ``exp`` overflows), and
``dw, dh`` are clamped at ``log(1000 / 16)`` so a wild prediction cannot produce an
infinite box.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


class BoxCoder:
    """Encode boxes relative to anchors and back.

    Args:
        weights: ``(wx, wy, ww, wh)`` multipliers of the deltas; RetinaNet uses ones.
        scale_clamp: upper bound of ``dw, dh`` before ``exp`` in ``decode``.
    """

    def __init__(self, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), scale_clamp: float = DEFAULT_SCALE_CLAMP):
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = float(scale_clamp)

    def encode(self, anchors: Tensor, boxes: Tensor) -> Tensor:
        """Regression targets of ``boxes`` w.r.t. ``anchors``; both ``(..., 4)`` xyxy -> ``(..., 4)``."""
        anchors, boxes = anchors.float(), boxes.float()
        wx, wy, ww, wh = self.weights
        aw = anchors[..., 2] - anchors[..., 0]
        ah = anchors[..., 3] - anchors[..., 1]
        ax = anchors[..., 0] + 0.5 * aw
        ay = anchors[..., 1] + 0.5 * ah
        bw = boxes[..., 2] - boxes[..., 0]
        bh = boxes[..., 3] - boxes[..., 1]
        bx = boxes[..., 0] + 0.5 * bw
        by = boxes[..., 1] + 0.5 * bh
        return torch.stack(
            [wx * (bx - ax) / aw, wy * (by - ay) / ah, ww * torch.log(bw / aw), wh * torch.log(bh / ah)], dim=-1
        )

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """Boxes ``(..., 4)`` xyxy from ``deltas (..., 4)`` applied to ``anchors (..., 4)``, in fp32."""
        deltas, anchors = deltas.float(), anchors.float()
        wx, wy, ww, wh = self.weights
        aw = anchors[..., 2] - anchors[..., 0]
        ah = anchors[..., 3] - anchors[..., 1]
        ax = anchors[..., 0] + 0.5 * aw
        ay = anchors[..., 1] + 0.5 * ah
        dx = deltas[..., 0] / wx
        dy = deltas[..., 1] / wy
        dw = (deltas[..., 2] / ww).clamp(max=self.scale_clamp)
        dh = (deltas[..., 3] / wh).clamp(max=self.scale_clamp)
        cx = dx * aw + ax
        cy = dy * ah + ay
        half_w = 0.5 * torch.exp(dw) * aw
        half_h = 0.5 * torch.exp(dh) * ah
        return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1)

    def __repr__(self) -> str:
        return f"BoxCoder(weights={self.weights}, scale_clamp={self.scale_clamp:.4f})"
