"""The data doctor: validate a COCO dataset and summarise what the detector will see.

`check_dataset` returns a `Report` with counts, box-size statistics, class imbalance, the
anchor coverage at the training resolution and a list of problems, each naming the
offending image or annotation ids. ``focaldet data check`` prints it and exits non-zero
when any problem is an error (training would fail or be wrong).
"""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou

from focaldet.data.coco import MIN_BOX_SIDE, read_coco_json
from focaldet.data.transforms import shortest_edge_scale
from focaldet.errors import DataError
from focaldet.inputs import InputSettings

__all__ = ["Report", "best_anchor_iou", "check_dataset"]

# COCO's small/medium/large thresholds on box area (original pixels).
SMALL_AREA, LARGE_AREA = 32**2, 96**2
COVERAGE_IOU = 0.5
LOW_COVERAGE = 0.8  # warn for categories whose anchor coverage is below this
MAX_EXAMPLES = 10  # ids quoted per problem

# EXIF orientations that transpose the image (decoders apply them, headers do not).
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}

# kind -> (severity, description); problems are grouped per kind, errors first.
_KINDS = {
    "image_fields": ("error", "image entries without id/file_name/width/height or with a non-positive size"),
    "dup_image": ("error", "duplicate image ids"),
    "dup_category": ("error", "duplicate category ids"),
    "dup_annotation": ("error", "duplicate annotation ids"),
    "unknown_image": ("error", "annotations referring to an image id that is not in 'images'"),
    "unknown_category": ("error", "annotations with a category id that is not in 'categories'"),
    "bad_bbox": ("error", "annotations without a valid bbox [x, y, w, h]"),
    "missing_file": ("error", "missing image files"),
    "unreadable": ("error", "unreadable image files"),
    "size_mismatch": ("error", "images whose size differs from their JSON width/height"),
    "dup_file": ("warning", "image entries sharing a file_name"),
    "nonpositive": ("warning", "boxes with zero or negative width/height, not trained on"),
    "degenerate": ("warning", f"boxes <= {MIN_BOX_SIDE:g} px wide or high after clipping, not trained on"),
    "outside": ("warning", "boxes extending outside their image, clipped for training"),
    "empty_category": ("warning", "categories without boxes"),
}


@dataclass
class Report:
    """What `check_dataset` found. Box statistics cover the boxes training uses
    (non-crowd, valid, at least ``MIN_BOX_SIDE`` after clipping); ``num_boxes`` counts all
    box annotations."""

    ann_file: str
    image_dir: str | None = None
    min_size: int = InputSettings.min_size
    max_size: int = InputSettings.max_size
    num_images: int = 0
    num_boxes: int = 0
    num_crowd: int = 0
    num_trainable: int = 0
    num_images_without_boxes: int = 0
    categories: list[dict[str, Any]] = field(default_factory=list)  # id, name, boxes, images
    size_counts: dict[str, int] = field(default_factory=dict)  # small / medium / large
    sqrt_area_percentiles: dict[str, float] = field(default_factory=dict)  # p5 .. p95
    imbalance_ratio: float | None = None
    anchor_coverage: float | None = None
    anchor_coverage_per_category: dict[str, float | None] = field(default_factory=dict)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (severity, message)

    @property
    def errors(self) -> list[str]:
        return [m for s, m in self.problems if s == "error"]

    @property
    def warnings(self) -> list[str]:
        return [m for s, m in self.problems if s == "warning"]

    @property
    def ok(self) -> bool:
        """Usable for training (warnings allowed)."""
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["problems"] = [{"severity": s, "message": m} for s, m in self.problems]
        out["ok"] = self.ok
        return out

    def format(self) -> str:
        """Human-readable multi-line report."""
        lines = [f"focaldet data check: {self.ann_file}"]
        if self.num_images or self.categories:
            folder = self.image_dir if self.image_dir is not None else "(not checked)"
            lines += [
                f"  images           {self.num_images} ({self.num_images_without_boxes} without boxes); folder {folder}",
                f"  boxes            {self.num_boxes} ({self.num_crowd} crowd, {self.num_trainable} used for training)",
                f"  categories       {len(self.categories)}",
                f"      {'id':>6}  {'name':<20} {'boxes':>7} {'images':>7}  anchor coverage",
            ]
            for cat in self.categories:
                cov = self.anchor_coverage_per_category.get(cat["name"])
                lines.append(
                    f"      {cat['id']:>6}  {cat['name'][:20]:<20} {cat['boxes']:>7} {cat['images']:>7}  {_pct(cov)}"
                )
            if self.imbalance_ratio is not None:
                lines.append(f"  class imbalance  {self.imbalance_ratio:.1f}x (most / least frequent category)")
            if self.size_counts:
                total = max(sum(self.size_counts.values()), 1)
                sizes = ", ".join(f"{k} {v} ({v / total:.0%})" for k, v in self.size_counts.items())
                lines.append(f"  box sizes        {sizes}  (COCO areas <32^2, <96^2, above; original pixels)")
                pcts = "  ".join(f"{k} {v:.0f}" for k, v in self.sqrt_area_percentiles.items())
                lines.append(f"  sqrt(area) px    {pcts}")
            if self.anchor_coverage is not None:
                lines.append(
                    f"  anchor coverage  {_pct(self.anchor_coverage)} of boxes have an anchor with IoU >= "
                    f"{COVERAGE_IOU} (resized to min_size {self.min_size}, max_size {self.max_size})"
                )
        if self.problems:
            lines.append("problems:")
            lines += [f"  {severity}: {message}" for severity, message in self.problems]
        n_err, n_warn = len(self.errors), len(self.warnings)
        verdict = "OK" if self.ok else "FAILED"
        lines.append(f"result: {verdict} ({n_err} error{'s' * (n_err != 1)}, {n_warn} warning{'s' * (n_warn != 1)})")
        return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


class _Problems:
    """Collects offending ids per problem kind and renders one message per kind."""

    def __init__(self) -> None:
        self.examples: dict[str, list[str]] = defaultdict(list)
        self.counts: Counter = Counter()

    def add(self, kind: str, example: str) -> None:
        self.counts[kind] += 1
        if len(self.examples[kind]) < MAX_EXAMPLES:
            self.examples[kind].append(example)

    def render(self) -> list[tuple[str, str]]:
        out = []
        for kind, (severity, description) in _KINDS.items():
            n = self.counts[kind]
            if n:
                more = f", ... ({n - MAX_EXAMPLES} more)" if n > MAX_EXAMPLES else ""
                out.append((severity, f"{description} ({n}): {', '.join(self.examples[kind])}{more}"))
        return out


# --------------------------------------------------------------------------------------
# Anchor coverage
# --------------------------------------------------------------------------------------


def _resized_size(h: int, w: int, min_size: int, max_size: int) -> tuple[int, int]:
    """Image size after `ResizeShortestEdge` (same rule and rounding)."""
    scale = shortest_edge_scale(h, w, min_size, max_size)
    return max(1, round(h * scale)), max(1, round(w * scale))


def best_anchor_iou(
    boxes: torch.Tensor, padded_size: tuple[int, int], generator: Any, chunk_size: int = 64
) -> torch.Tensor:
    """Best IoU of each box ``(G, 4)`` xyxy with the anchors of an input of ``padded_size``.

    Same result as ``box_iou(boxes, generator(shapes)).max(1)`` over all anchors, but only
    scores the anchors centred on the 2x2 grid points around each box centre on every
    level: among anchors of one shape, IoU only grows as the centres get closer in x and in
    y, so the best anchor is always among those. This keeps the doctor fast on COCO-sized
    sets. Returns ``(G,)``.
    """
    if len(boxes) == 0:
        return boxes.new_zeros((0,))
    shapes = generator.feature_shapes(*padded_size)
    anchors = generator(shapes, "cpu")
    num_anchors = generator.num_anchors
    offset = float(getattr(generator, "offset", 0.0))
    strides = torch.tensor(generator.strides, dtype=torch.float32)  # (L,)
    heights = torch.tensor([h for h, _ in shapes])  # (L,)
    widths = torch.tensor([w for _, w in shapes])
    counts = torch.tensor(generator.num_per_level(shapes))
    starts = torch.cumsum(counts, 0) - counts  # first anchor row of each level

    step = torch.tensor([0, 1])
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    gx = torch.floor(cx[:, None] / strides - offset).long()[..., None] + step  # (G, L, 2)
    gy = torch.floor(cy[:, None] / strides - offset).long()[..., None] + step
    gx = torch.minimum(gx.clamp(min=0), (widths - 1)[None, :, None])
    gy = torch.minimum(gy.clamp(min=0), (heights - 1)[None, :, None])
    cells = gy[..., :, None] * widths[None, :, None, None] + gx[..., None, :]  # (G, L, 2, 2)
    index = starts[None, :, None, None, None] + cells[..., None] * num_anchors + torch.arange(num_anchors)
    index = index.reshape(len(boxes), -1)  # (G, L*2*2*A) candidate anchor rows

    best = []
    for i in range(0, len(boxes), chunk_size):  # a chunk shares one set of candidates
        candidates = torch.unique(index[i : i + chunk_size])
        best.append(box_iou(boxes[i : i + chunk_size], anchors[candidates]).max(dim=1).values)
    return torch.cat(best)


# --------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------


def _image_header_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` as decoders return it, from the file header when PIL is available."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - PIL ships with torchvision/matplotlib
        import cv2

        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise OSError("not a decodable image")
        return image.shape[1], image.shape[0]
    with Image.open(path) as im:
        width, height = im.size
        if im.getexif().get(0x0112) in _TRANSPOSING_ORIENTATIONS:
            width, height = height, width
    return width, height


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_dataset(
    ann_file: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    min_size: int = InputSettings.min_size,
    max_size: int = InputSettings.max_size,
    size_divisibility: int = InputSettings.size_divisibility,
    anchor_generator: Any | None = None,
) -> Report:
    """Validate a COCO instances JSON (and its image files when ``image_dir`` is given).

    Anchor coverage: each trainable box is scaled like its image by the
    shorter-side-``min_size`` / longer-side-``max_size`` resize, the image padded to
    ``size_divisibility``, and the box counts as covered when its best anchor
    (``anchor_generator``, default `AnchorGenerator()`) has IoU >= 0.5.
    """
    report = Report(str(ann_file), None if image_dir is None else str(image_dir), min_size, max_size)
    try:
        data = read_coco_json(ann_file)
    except DataError as e:
        report.problems.append(("error", str(e)))
        return report
    problems = _Problems()

    # Images.
    images: dict[Any, dict] = {}
    file_names: dict[str, Any] = {}
    for i, img in enumerate(data["images"]):
        fields_ok = isinstance(img, dict) and all(k in img for k in ("id", "file_name", "width", "height"))
        if not fields_ok or not (_is_number(img["width"]) and _is_number(img["height"])) or min(img["width"], img["height"]) <= 0:
            problems.add("image_fields", f"images[{i}]" + (f" (id {img.get('id')})" if isinstance(img, dict) else ""))
            continue
        if img["id"] in images:
            problems.add("dup_image", f"image {img['id']}")
            continue
        images[img["id"]] = img
        if img["file_name"] in file_names:
            problems.add("dup_file", f"images {file_names[img['file_name']]} and {img['id']} ({img['file_name']})")
        file_names.setdefault(img["file_name"], img["id"])
    report.num_images = len(images)

    # Categories.
    categories: dict[Any, str] = {}
    for i, cat in enumerate(data["categories"]):
        cid = cat.get("id") if isinstance(cat, dict) else None
        if cid in categories:
            problems.add("dup_category", f"category {cid}")
        elif cid is not None:
            categories[cid] = str(cat.get("name", cid))

    # Annotations.
    ann_ids: set = set()
    trainable: dict[Any, list[tuple[list[float], Any]]] = defaultdict(list)  # image id -> [(xyxy, cat)]
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            problems.add("bad_bbox", f"annotations[{i}]")
            continue
        aid = ann.get("id", f"annotations[{i}]")
        if aid in ann_ids:
            problems.add("dup_annotation", f"annotation {aid}")
        ann_ids.add(aid)
        bbox = ann.get("bbox")
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            problems.add("bad_bbox", f"annotation {aid}")
            continue
        report.num_boxes += 1
        img = images.get(ann.get("image_id"))
        if img is None:
            problems.add("unknown_image", f"annotation {aid} (image id {ann.get('image_id')!r})")
            continue
        if ann.get("category_id") not in categories:
            problems.add("unknown_category", f"annotation {aid} (category id {ann.get('category_id')!r})")
            continue
        if ann.get("iscrowd", 0):
            report.num_crowd += 1
            continue
        where = f"annotation {aid} (image {img['id']})"
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            problems.add("nonpositive", where)
            continue
        width, height = img["width"], img["height"]
        x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
        if x2 - x1 <= MIN_BOX_SIDE or y2 - y1 <= MIN_BOX_SIDE:
            problems.add("degenerate", where)
            continue
        if x < 0 or y < 0 or x + w > width or y + h > height:
            problems.add("outside", where)
        trainable[img["id"]].append(([x1, y1, x2, y2], ann["category_id"]))

    # Image files.
    if image_dir is not None and not Path(image_dir).is_dir():
        report.problems.append(("error", f"image folder {image_dir} does not exist"))
    elif image_dir is not None:
        for image_id, img in images.items():
            path = Path(image_dir) / str(img["file_name"])
            if not path.is_file():
                problems.add("missing_file", f"image {image_id} ({path})")
                continue
            try:
                size = _image_header_size(path)
            except Exception as e:  # noqa: BLE001 - any decoder failure means unreadable
                problems.add("unreadable", f"image {image_id} ({path}: {e})")
                continue
            if size != (img["width"], img["height"]):
                problems.add(
                    "size_mismatch",
                    f"image {image_id} ({img['file_name']}: {size[0]}x{size[1]} on disk, "
                    f"{img['width']}x{img['height']} in JSON)",
                )

    # Statistics over trainable boxes.
    cat_boxes: Counter = Counter()
    cat_images: dict[Any, set] = defaultdict(set)
    areas = []
    for image_id, items in trainable.items():
        for (x1, y1, x2, y2), cid in items:
            cat_boxes[cid] += 1
            cat_images[cid].add(image_id)
            areas.append((x2 - x1) * (y2 - y1))
    report.num_trainable = len(areas)
    report.num_images_without_boxes = sum(1 for image_id in images if image_id not in trainable)
    report.categories = [
        {"id": cid, "name": name, "boxes": cat_boxes[cid], "images": len(cat_images[cid])}
        for cid, name in sorted(categories.items(), key=lambda kv: kv[0])
    ]
    for cat in report.categories:
        if cat["boxes"] == 0:
            problems.add("empty_category", f"category {cat['id']} ({cat['name']})")
    counts = [c["boxes"] for c in report.categories if c["boxes"] > 0]
    report.imbalance_ratio = max(counts) / min(counts) if counts else None
    if areas:
        a = np.asarray(areas)
        report.size_counts = {
            "small": int((a < SMALL_AREA).sum()),
            "medium": int(((a >= SMALL_AREA) & (a < LARGE_AREA)).sum()),
            "large": int((a >= LARGE_AREA).sum()),
        }
        q = (5, 25, 50, 75, 95)
        report.sqrt_area_percentiles = {f"p{p}": float(v) for p, v in zip(q, np.percentile(np.sqrt(a), q))}

    # Anchor coverage.
    if areas:
        if anchor_generator is None:
            from focaldet.modeling.anchors import AnchorGenerator

            anchor_generator = AnchorGenerator()
        # Images of the same size share their anchors: score all their boxes together.
        by_size: dict[tuple[int, int], list[tuple[list[float], Any]]] = defaultdict(list)
        for image_id, items in trainable.items():
            by_size[(int(images[image_id]["height"]), int(images[image_id]["width"]))] += items
        div = max(int(size_divisibility), 1)
        covered: Counter = Counter()
        for (h, w), items in by_size.items():
            rh, rw = _resized_size(h, w, min_size, max_size)
            padded = (-(-rh // div) * div, -(-rw // div) * div)
            boxes = torch.tensor([b for b, _ in items], dtype=torch.float32)
            boxes *= torch.tensor([rw / w, rh / h, rw / w, rh / h])
            hits = best_anchor_iou(boxes, padded, anchor_generator) >= COVERAGE_IOU
            for (_, cid), hit in zip(items, hits.tolist()):
                covered[cid] += hit
        report.anchor_coverage = sum(covered.values()) / len(areas)
        low = []
        for cat in report.categories:
            cov = covered[cat["id"]] / cat["boxes"] if cat["boxes"] else None
            report.anchor_coverage_per_category[cat["name"]] = cov
            if cov is not None and cov < LOW_COVERAGE:
                low.append(f"{cat['name']} {_pct(cov)}")
        if low:
            report.problems.append(
                (
                    "warning",
                    f"low anchor coverage at min_size {min_size}/max_size {max_size} (share of boxes with "
                    f"an anchor at IoU >= {COVERAGE_IOU}): {', '.join(low)}; "
                    f"consider smaller/other-shaped anchors or a larger min_size",
                )
            )

    if not data["images"]:
        report.problems.append(("warning", "the dataset has no images"))
    elif report.num_trainable == 0:
        report.problems.append(("warning", "no box can be trained on"))
    report.problems = sorted(problems.render() + report.problems, key=lambda p: p[0] != "error")
    return report
