"""A small, deterministic, learnable COCO-format dataset of coloured shapes.

Every image has a textured background (noise, gradient or stripes) and 3-8 filled shapes
(about 6% of images have none). The class is the *shape* (colours are random): circle,
square, triangle, cross by default, plus ring, diamond, star and hexagon for more classes.
Boxes are the tight bounding boxes of the drawn pixels. The first class is about three
times as frequent as each other one, and category ids are deliberately non-contiguous
(1, 3, 7, 8, ...) so that the label mapping is exercised.

Layout written by `write_synthetic_coco`::

    OUT/annotations/instances_train.json
    OUT/annotations/instances_val.json
    OUT/images/synth_000001.jpg ...
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from focaldet.errors import ConfigError

__all__ = ["SHAPES", "CATEGORY_IDS", "SyntheticCoco", "render_image", "write_synthetic_coco"]

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "star", "hexagon")
CATEGORY_IDS = (1, 3, 7, 8, 12, 15, 21, 30)

EMPTY_IMAGE_PROB = 0.06
TINY_OBJECT_PROB = 0.08
MAX_OVERLAP = 0.25  # at most this fraction of any box may be covered by another box
CROWDED_OBJECTS = (300, 1000)  # objects per 512x512 crowded image (scaled with the area)


class SyntheticCoco(NamedTuple):
    """Paths written by `write_synthetic_coco`."""

    root: Path
    images: Path
    train_ann: Path
    val_ann: Path


# --------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """``(size, size, 3)`` float32 texture: noise blobs, a gradient or stripes."""
    kind = rng.integers(3)
    c1, c2 = rng.uniform(30, 225, size=(2, 3)).astype(np.float32)
    if kind == 0:  # low-frequency noise around a base colour
        coarse = rng.normal(0, 1, size=(6, 6, 3)).astype(np.float32)
        blobs = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
        image = c1 + 25 * blobs
    else:
        angle = rng.uniform(0, math.pi)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        t = (xx * math.cos(angle) + yy * math.sin(angle)) / size  # ~[-1, 1.4]
        if kind == 1:  # linear gradient between two colours
            t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        else:  # soft stripes, period 10-40 px, reduced contrast
            period = rng.uniform(10, 40) / size
            t = 0.5 + 0.25 * np.sin(2 * math.pi * t / period)
        image = c1 + (c2 - c1) * t[..., None]
    return image


def _polygon(points: np.ndarray, w: int, h: int) -> np.ndarray:
    """Stretch unit-shape ``points (P, 2)`` to exactly fill a ``w x h`` patch; int32."""
    points = points - points.min(0)
    points = points / points.max(0) * np.array([w - 1, h - 1])
    return np.round(points).astype(np.int32)


def _shape_mask(shape: str, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """``(h, w)`` uint8 mask of a filled shape touching all four patch borders."""
    mask = np.zeros((h, w), dtype=np.uint8)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    if shape in ("circle", "ring"):
        cv2.ellipse(mask, (round(cx), round(cy)), (int(w // 2), int(h // 2)), 0, 0, 360, 255, -1)
        if shape == "ring":
            inner = (max(1, int(w * 0.28)), max(1, int(h * 0.28)))
            cv2.ellipse(mask, (round(cx), round(cy)), inner, 0, 0, 360, 0, -1)
    elif shape == "square":
        mask[:] = 255
    elif shape == "cross":
        tw, th = max(2, round(w / 3)), max(2, round(h / 3))
        x0, y0 = round(cx - tw / 2), round(cy - th / 2)
        mask[y0 : y0 + th, :] = 255
        mask[:, x0 : x0 + tw] = 255
    else:
        if shape == "triangle":
            unit = np.array([[0, 1], [1, 1], [0.5, 0]]) if rng.random() < 0.5 else np.array([[0, 0], [1, 0], [0.5, 1]])
        elif shape == "diamond":
            unit = np.array([[0.5, 0], [1, 0.5], [0.5, 1], [0, 0.5]])
        elif shape == "star":
            k = np.arange(10)
            radius = np.where(k % 2 == 0, 1.0, 0.45)
            theta = -math.pi / 2 + k * math.pi / 5
            unit = np.stack([radius * np.cos(theta), radius * np.sin(theta)], 1)
        elif shape == "hexagon":
            theta = np.arange(6) * math.pi / 3
            unit = np.stack([np.cos(theta), np.sin(theta)], 1)
        else:
            raise ConfigError(f"unknown shape {shape!r}")
        cv2.fillPoly(mask, [_polygon(unit, w, h)], 255)
    return mask


def _overlap_ok(box: np.ndarray, boxes: list[np.ndarray]) -> bool:
    """No more than `MAX_OVERLAP` of either box's area covered by their intersection."""
    for other in boxes:
        iw = min(box[2], other[2]) - max(box[0], other[0])
        ih = min(box[3], other[3]) - max(box[1], other[1])
        if iw > 0 and ih > 0:
            inter = iw * ih
            smaller = min((box[2] - box[0]) * (box[3] - box[1]), (other[2] - other[0]) * (other[3] - other[1]))
            if inter > MAX_OVERLAP * smaller:
                return False
    return True


def _draw(image: np.ndarray, rng: np.random.Generator, cls: int, x: int, y: int, w: int, h: int) -> list[float] | None:
    """Paint shape ``cls`` into the ``w x h`` patch at ``(x, y)`` of ``image`` in a colour that
    stands out from its background: the tight ``[x, y, w, h]`` box of its visible part, or
    None when all of it falls outside the image."""
    size = image.shape[0]
    mask = _shape_mask(SHAPES[cls], w, h, rng)
    # Part of the shape may fall outside the image: keep what is visible.
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, size), min(y + h, size)
    visible = mask[y0 - y : y1 - y, x0 - x : x1 - x] > 0
    ys, xs = np.nonzero(visible)
    if len(xs) == 0:
        return None
    region = image[y0:y1, x0:x1]
    background = region[visible].mean(0)
    colour = rng.uniform(0, 255, size=3)
    for _retry in range(10):  # the shape must stand out from its background
        if np.linalg.norm(colour - background) >= 90:
            break
        colour = rng.uniform(0, 255, size=3)
    region[visible] = colour
    bx, by = x0 + xs.min(), y0 + ys.min()
    return [float(bx), float(by), float(x0 + xs.max() + 1 - bx), float(y0 + ys.max() + 1 - by)]


def _crowded_objects(image: np.ndarray, rng: np.random.Generator, weights: np.ndarray) -> list[tuple[int, list[float]]]:
    """`CROWDED_OBJECTS` small shapes (scaled with the image's area), one per cell of a
    random subset of a square grid, each filling 55-90 % of its cell: no overlaps."""
    size = image.shape[0]
    lo, hi = (max(1, round(v * (size / 512) ** 2)) for v in CROWDED_OBJECTS)
    count = int(rng.integers(lo, hi + 1))
    per_side = math.ceil(math.sqrt(count))
    cell = size / per_side
    objects = []
    for index in sorted(rng.choice(per_side * per_side, size=count, replace=False).tolist()):
        cls = int(rng.choice(len(weights), p=weights))
        w, h = (max(4, round(cell * rng.uniform(0.55, 0.9))) for _ in range(2))
        x = int((index % per_side) * cell + rng.uniform(0, max(cell - w, 0)))
        y = int((index // per_side) * cell + rng.uniform(0, max(cell - h, 0)))
        box = _draw(image, rng, cls, x, y, w, h)
        if box is not None:
            objects.append((cls, box))
    return objects


def render_image(
    rng: np.random.Generator, size: int = 256, num_classes: int = 4, crowded: bool = False
) -> tuple[np.ndarray, list[tuple[int, list[float]]]]:
    """One ``(size, size, 3)`` uint8 RGB image and its objects as ``(class index, [x, y, w, h])``;
    ``crowded``: hundreds of small objects (`CROWDED_OBJECTS`) instead of 3-8."""
    image = _background(rng, size)
    weights = np.array([3.0] + [1.0] * (num_classes - 1))
    weights /= weights.sum()
    if crowded:
        objects = _crowded_objects(image, rng, weights)
        image += rng.normal(0, 4, size=image.shape).astype(np.float32)  # sensor-like noise
        return np.clip(image, 0, 255).astype(np.uint8), objects
    scale = size / 256
    num_objects = 0 if rng.random() < EMPTY_IMAGE_PROB else int(rng.integers(3, 9))
    placed: list[np.ndarray] = []
    objects: list[tuple[int, list[float]]] = []
    for _ in range(num_objects):
        cls = int(rng.choice(num_classes, p=weights))
        if rng.random() < TINY_OBJECT_PROB:
            side = rng.uniform(10, 18) * scale
        else:
            side = math.exp(rng.uniform(math.log(24), math.log(90))) * scale
        ratio = math.exp(rng.uniform(math.log(0.75), math.log(1.33)))
        w, h = max(4, round(side * math.sqrt(ratio))), max(4, round(side / math.sqrt(ratio)))
        for _attempt in range(20):  # find a spot that does not hide other objects
            x = int(rng.integers(-w // 8, size - w + w // 8 + 1))
            y = int(rng.integers(-h // 8, size - h + h // 8 + 1))
            full = np.array([x, y, x + w, y + h], dtype=np.float64)
            if _overlap_ok(full, placed):
                break
        else:
            continue
        box = _draw(image, rng, cls, x, y, w, h)
        if box is not None:
            placed.append(full)
            objects.append((cls, box))
    image += rng.normal(0, 4, size=image.shape).astype(np.float32)  # sensor-like noise
    return np.clip(image, 0, 255).astype(np.uint8), objects


# --------------------------------------------------------------------------------------
# Dataset writer
# --------------------------------------------------------------------------------------


def write_synthetic_coco(
    out_dir: str | Path,
    num_images: int = 700,
    seed: int = 0,
    num_classes: int = 4,
    image_size: int = 256,
    val_fraction: float = 0.15,
    crowded: bool = False,
) -> SyntheticCoco:
    """Write the shapes dataset (deterministic for ``seed``) and return its paths.

    ``round(num_images * val_fraction)`` images (at least one) go to the val split, the
    rest to train. Defaults: 595 train + 105 val images of 256x256 px, 4 classes.
    ``crowded``: 300-1000 small objects per image at 512 px (scaled with the area: 75-250
    at 256 px), as in retail-shelf and aerial scenes.
    """
    if not 1 <= num_classes <= len(SHAPES):
        raise ConfigError(f"num_classes must be in 1..{len(SHAPES)}, got {num_classes}")
    if num_images < 2:
        raise ConfigError(f"num_images must be >= 2 (train and val), got {num_images}")
    if image_size < 32:
        raise ConfigError(f"image_size must be >= 32 px, got {image_size}")
    num_val = min(max(1, round(num_images * val_fraction)), num_images - 1)

    root = Path(out_dir)
    images_dir, ann_dir = root / "images", root / "annotations"
    images_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(seed)
    categories = [
        {"id": CATEGORY_IDS[k], "name": SHAPES[k], "supercategory": "shape"} for k in range(num_classes)
    ]
    splits = {"train": {"images": [], "annotations": []}, "val": {"images": [], "annotations": []}}
    ann_id = 0
    for index in range(num_images):
        image_id = index + 1
        split = splits["train" if index < num_images - num_val else "val"]
        image, objects = render_image(rng, image_size, num_classes, crowded)
        file_name = f"synth_{image_id:06d}.jpg"
        ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
        if not ok:
            raise RuntimeError(f"JPEG encoding failed for {file_name}")
        (images_dir / file_name).write_bytes(encoded.tobytes())
        split["images"].append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
        for cls, bbox in objects:
            ann_id += 1
            split["annotations"].append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": CATEGORY_IDS[cls],
                    "bbox": bbox,
                    "area": bbox[2] * bbox[3],
                    "iscrowd": 0,
                }
            )

    info = {"description": f"focaldet synthetic shapes (seed {seed})", "version": "1.0"}
    paths = {}
    for name, split in splits.items():
        path = ann_dir / f"instances_{name}.json"
        data = {"info": info, "licenses": [], "categories": categories, **split}
        path.write_text(json.dumps(data))
        paths[name] = path
    return SyntheticCoco(root=root, images=images_dir, train_ann=paths["train"], val_ann=paths["val"])
