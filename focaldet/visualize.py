"""Draw detections on images and tile them into a PNG (used by the demo and callbacks).

Images are ``(C, H, W)`` tensors, ``uint8`` or float in ``[0, 1]``; detections are
torchvision-style dicts (``boxes`` xyxy in the image's pixels, ``scores``, contiguous
``labels``). Ground truth (``boxes``, ``labels``) can be drawn under the detections as
thin white boxes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, make_grid

# Tableau-like palette of distinguishable colours; class k always gets PALETTE[k % len].
PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (219, 219, 141), (158, 218, 229), (57, 59, 121),
]  # fmt: skip
GT_COLOR = (255, 255, 255)


def class_color(label: int) -> tuple[int, int, int]:
    """The stable RGB colour of contiguous class ``label``."""
    return PALETTE[int(label) % len(PALETTE)]


def _to_uint8_rgb(image: Tensor) -> Tensor:
    image = image.detach().cpu()
    if image.dtype != torch.uint8:
        image = (image.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def _valid(boxes: Tensor) -> Tensor:
    """Mask of finite boxes with ``x1 <= x2`` and ``y1 <= y2`` (draw_bounding_boxes raises otherwise)."""
    return boxes.isfinite().all(dim=1) & (boxes[:, 0] <= boxes[:, 2]) & (boxes[:, 1] <= boxes[:, 3])


def _name(class_names: Sequence[str], label: int) -> str:
    return class_names[label] if 0 <= label < len(class_names) else str(label)


def draw_detections(
    image: Tensor,
    detections: dict[str, Tensor],
    class_names: Sequence[str],
    score_threshold: float | Sequence[float] = 0.3,
    target: dict[str, Tensor] | None = None,
    width: int = 2,
) -> Tensor:
    """Draw the detections scoring at least ``score_threshold`` (one number, or one per
    class) on ``image``.

    Each box is coloured by class (:func:`class_color`) and labelled ``"name 0.87"`` in
    black on a tag of the box's colour.
    If ``target`` is given, its ground-truth boxes are drawn first, thin and white.

    Returns:
        A new ``uint8`` ``(3, H, W)`` tensor.
    """
    out = _to_uint8_rgb(image)
    if target is not None and len(target["boxes"]):
        gt_boxes = target["boxes"].detach().cpu().float().reshape(-1, 4)
        out = draw_bounding_boxes(out, gt_boxes[_valid(gt_boxes)], colors=GT_COLOR, width=1)

    boxes = detections["boxes"].detach().cpu().float().reshape(-1, 4)
    scores = detections["scores"].detach().cpu().float().reshape(-1)
    labels = detections["labels"].detach().cpu().long().reshape(-1)
    if isinstance(score_threshold, (int, float)):
        keep = scores >= score_threshold
    else:  # per class; a nan threshold keeps nothing of its class
        thr = torch.as_tensor(list(score_threshold), dtype=torch.float32)
        keep = scores >= thr[labels.clamp(0, len(thr) - 1)]
    keep &= _valid(boxes)
    if not keep.any():
        return out
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep].tolist()
    texts = [f"{_name(class_names, lab)} {s:.2f}" for lab, s in zip(labels, scores.tolist())]
    colors = [class_color(lab) for lab in labels]
    return draw_bounding_boxes(out, boxes, labels=texts, colors=colors, width=width, fill_labels=True)


def _fit(image: Tensor, boxes_dicts: Sequence[dict[str, Tensor] | None], max_size: int):
    """Downscale ``image`` so its longer side is at most ``max_size``, boxes along with it."""
    h, w = image.shape[-2:]
    scale = min(1.0, max_size / max(h, w))
    if scale == 1.0:
        return image, list(boxes_dicts)
    size = [max(1, round(h * scale)), max(1, round(w * scale))]
    image = TF.resize(image, size, antialias=True)
    factor = torch.tensor([size[1] / w, size[0] / h, size[1] / w, size[0] / h])
    scaled = [None if d is None else {**d, "boxes": d["boxes"].detach().cpu().float() * factor} for d in boxes_dicts]
    return image, scaled


def save_detection_grid(
    images: Sequence[Tensor],
    detections_list: Sequence[dict[str, Tensor]],
    class_names: Sequence[str],
    path: str | os.PathLike,
    ncols: int = 4,
    score_threshold: float | Sequence[float] = 0.3,
    targets: Sequence[dict[str, Tensor]] | None = None,
    max_size: int = 640,
) -> Path:
    """Save :func:`detection_grid` as a PNG."""
    grid = detection_grid(images, detections_list, class_names, ncols, score_threshold, targets, max_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)  # torchvision.io is deprecated (0.29)
    return path


def detection_grid(
    images: Sequence[Tensor],
    detections_list: Sequence[dict[str, Tensor]],
    class_names: Sequence[str],
    ncols: int = 4,
    score_threshold: float | Sequence[float] = 0.3,
    targets: Sequence[dict[str, Tensor]] | None = None,
    max_size: int = 640,
) -> Tensor:
    """Draw each image's detections (and ground truth) and tile them: a ``uint8 (3, H, W)`` tensor.

    Images may differ in size: each is first downscaled to at most ``max_size`` pixels on
    its longer side (boxes scaled to match, so labels stay readable), then padded with
    black at the bottom/right to the largest size, and laid out ``ncols`` per row.
    ``score_threshold`` is one number or one per class (e.g. the F1 thresholds).
    """
    if len(images) != len(detections_list) or (targets is not None and len(targets) != len(images)):
        raise ValueError("images, detections_list and targets must have the same length")
    if not images:
        raise ValueError("no images to draw")
    drawn = []
    for i, (image, det) in enumerate(zip(images, detections_list)):
        image, (det, tgt) = _fit(_to_uint8_rgb(image), [det, None if targets is None else targets[i]], max_size)
        drawn.append(draw_detections(image, det, class_names, score_threshold, target=tgt))
    h = max(d.shape[1] for d in drawn)
    w = max(d.shape[2] for d in drawn)
    padded = [TF.pad(d, [0, 0, w - d.shape[2], h - d.shape[1]]) for d in drawn]
    return make_grid(torch.stack(padded), nrow=ncols, padding=4, pad_value=0)
