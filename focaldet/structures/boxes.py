"""Pure box helpers that torchvision.ops does not already provide.

Inside focaldet boxes are always float ``xyxy`` tensors in pixels; COCO ``xywh`` appears
only at the data and evaluation edges. IoU, NMS and format conversion in general live in
``torchvision.ops`` and are used from there.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert


def xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """COCO ``(x, y, w, h)`` -> ``(x1, y1, x2, y2)``; shape ``(..., 4)``."""
    return box_convert(boxes, "xywh", "xyxy")


def xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """``(x1, y1, x2, y2)`` -> COCO ``(x, y, w, h)``; shape ``(..., 4)``."""
    return box_convert(boxes, "xyxy", "xywh")


def clip_boxes(boxes: Tensor, sizes: Tensor) -> Tensor:
    """Clip ``boxes (N, M, 4)`` to per-image ``sizes (N, 2)`` given as ``(h, w)``.

    Batched counterpart of ``torchvision.ops.clip_boxes_to_image`` (which takes a single
    size): every image of a padded batch is clipped to its own extent.
    """
    h = sizes[:, 0].to(boxes.dtype).view(-1, 1)  # (N, 1)
    w = sizes[:, 1].to(boxes.dtype).view(-1, 1)
    x1 = torch.minimum(boxes[..., 0].clamp(min=0), w)
    y1 = torch.minimum(boxes[..., 1].clamp(min=0), h)
    x2 = torch.minimum(boxes[..., 2].clamp(min=0), w)
    y2 = torch.minimum(boxes[..., 3].clamp(min=0), h)
    return torch.stack([x1, y1, x2, y2], dim=-1)


def rescale_boxes(boxes: Tensor, from_size, to_size) -> Tensor:
    """Map ``xyxy`` boxes from an image of ``from_size (h, w)`` to one of ``to_size (h, w)``.

    Used to send detections on a resized image back to the original pixels: x scales with
    the width ratio and y with the height ratio, exactly as the resize did.
    """
    fh, fw = (float(v) for v in from_size)
    th, tw = (float(v) for v in to_size)
    scale = boxes.new_tensor([tw / fw, th / fh, tw / fw, th / fh])
    return boxes * scale
