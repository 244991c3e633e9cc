"""The data doctor: validate a COCO dataset and summarise what the detector will see.

`check_dataset` returns a `Report` with counts, box-size statistics, class imbalance, the
anchor coverage at the training resolution and a list of problems, each naming the
offending image or annotation ids. The annotation rules are those of the loader
(`focaldet.data.validate`); with an image folder every image is decoded
(`focaldet.data.scan`, cached) and undecodable, truncated, EXIF-turned and converted files
are reported. ``focaldet data check`` prints it and exits non-zero when any problem is an
error (training would fail or be wrong).
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from focaldet.data.coco import read_coco_json
from focaldet.data.sampling import class_repeat_factors, expected_class_frequency, repeat_factors
from focaldet.data.scan import format_mismatch, scan_images
from focaldet.data.validate import CocoValidation, Problems, validate_coco
from focaldet.errors import DataError
from focaldet.config.inputs import InputSettings, resized_size

__all__ = ["Report", "check_dataset"]

# COCO's small/medium/large thresholds on box area (original pixels).
SMALL_AREA, LARGE_AREA = 32**2, 96**2
COVERAGE_IOU = 0.5
LOW_COVERAGE = 0.8  # warn for categories whose anchor coverage is below this


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
    num_crowd_images: int = 0  # images with at least one (valid, non-degenerate) crowd region
    num_trainable: int = 0
    num_images_without_boxes: int = 0
    categories: list[dict[str, Any]] = field(default_factory=list)  # id, name, boxes, images
    size_counts: dict[str, int] = field(default_factory=dict)  # small / medium / large
    sqrt_area_percentiles: dict[str, float] = field(default_factory=dict)  # p5 .. p95
    imbalance_ratio: float | None = None
    anchor_coverage: float | None = None
    anchor_coverage_per_category: dict[str, float | None] = field(default_factory=dict)
    # Repeat-factor sampling (only with a threshold): per category id, name, repeat_factor (r_c),
    # images_per_epoch and share without it, sampled_images_per_epoch and sampled_share with it.
    repeat_threshold: float | None = None
    repeat_rule: str = "sqrt"
    sampling: list[dict[str, Any]] = field(default_factory=list)
    sampled_epoch_length: float | None = None  # expected images per epoch with it (sum of factors)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (severity, message)

    @property
    def errors(self) -> list[str]:
        return [m for s, m in self.problems if s == "error"]

    @property
    def warnings(self) -> list[str]:
        return [m for s, m in self.problems if s == "warning"]

    @property
    def infos(self) -> list[str]:
        """What is worth knowing but needs no action (EXIF orientations, colour conversions)."""
        return [m for s, m in self.problems if s == "info"]

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
                *([f"  crowd regions    {self.num_crowd} in {self.num_crowd_images} images: their background "
                   "anchors are ignored in training (model.criterion.crowd_ioa_threshold)"] if self.num_crowd else []),
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
        if self.repeat_threshold is not None and self.sampled_epoch_length is not None:
            lines += [
                f"  repeat-factor sampling (t {self.repeat_threshold:g}, {self.repeat_rule} rule): "
                f"{self.sampled_epoch_length:.1f} images per epoch on average instead of {self.num_images}",
                f"      {'id':>6}  {'name':<20} {'r_c':>6}  {'images/epoch':>12} {'share':>7}  "
                f"{'sampled':>9} {'share':>7}",
            ]
            for row in self.sampling:
                lines.append(
                    f"      {row['id']:>6}  {row['name'][:20]:<20} {row['repeat_factor']:>6.2f}  "
                    f"{row['images_per_epoch']:>12.0f} {_pct(row['share']):>7}  "
                    f"{row['sampled_images_per_epoch']:>9.1f} {_pct(row['sampled_share']):>7}"
                )
            lines.append("      (images per epoch containing the class and their share of the epoch, "
                         "without and with it; data.sampler: repeat_factor)")
        if self.problems:
            lines.append("problems:")
            lines += [f"  {severity}: {message}" for severity, message in self.problems]
        n_err, n_warn = len(self.errors), len(self.warnings)
        verdict = "OK" if self.ok else "FAILED"
        lines.append(f"result: {verdict} ({n_err} error{'s' * (n_err != 1)}, {n_warn} warning{'s' * (n_warn != 1)})")
        return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


# --------------------------------------------------------------------------------------
# Anchor coverage
# --------------------------------------------------------------------------------------


def _resized_size(h: int, w: int, min_size: int, max_size: int) -> tuple[int, int]:
    """Image size after `ResizeShortestEdge` (`focaldet.config.inputs.resized_size`)."""
    return resized_size(h, w, min_size, max_size)


# --------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------


def check_dataset(
    ann_file: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    min_size: int = InputSettings.min_size,
    max_size: int = InputSettings.max_size,
    size_divisibility: int = InputSettings.size_divisibility,
    anchor_generator: Any | None = None,
    workers: int | None = None,
    progress: bool | None = False,
    cache: bool = True,
    repeat_threshold: float | None = None,
    repeat_rule: str = "sqrt",
) -> Report:
    """Validate a COCO instances JSON (and its image files when ``image_dir`` is given).

    Anchor coverage: each trainable box is scaled like its image by the
    shorter-side-``min_size`` / longer-side-``max_size`` resize, the image padded to
    ``size_divisibility``, and the box counts as covered when its best anchor
    (``anchor_generator``, default `AnchorGenerator()`) has IoU >= 0.5.

    Image files are decoded in ``workers`` threads with a progress bar when ``progress``
    (``None``: when stderr is a terminal); ``cache`` reuses and stores the scan results
    (see `focaldet.data.scan`).

    With a ``repeat_threshold`` the report also has the expected per-class frequency per
    epoch without and with repeat-factor sampling (`focaldet.data.sampling`, ``repeat_rule``).
    """
    report = Report(str(ann_file), None if image_dir is None else str(image_dir), min_size, max_size)
    try:
        data = read_coco_json(ann_file)
    except DataError as e:
        report.problems.append(("error", str(e)))
        return report
    checked = validate_coco(data)
    problems = checked.problems
    images = checked.images
    categories = checked.categories
    report.num_images = len(images)
    report.num_boxes = checked.num_boxes
    report.num_crowd = checked.num_crowd
    report.num_crowd_images = sum(1 for items in checked.crowd.values() if items)
    trainable = {image_id: [(box, cid) for _, cid, box in items] for image_id, items in checked.boxes.items()}

    if image_dir is not None and not Path(image_dir).is_dir():
        report.problems.append(("error", f"image folder {image_dir} does not exist"))
    elif image_dir is not None:
        _check_image_files(checked, Path(image_dir), workers, progress, cache)

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

    if repeat_threshold is not None:
        _sampling(report, [[cid for _, cid in trainable.get(i, [])] for i in images], repeat_threshold, repeat_rule)

    # Anchor coverage.
    if areas:
        from focaldet.modeling.anchors import AnchorGenerator, best_anchor_iou

        if anchor_generator is None:
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

    if not images and not problems.count("error"):
        report.problems.append(("warning", "the dataset has no images"))
    elif report.num_trainable == 0:
        report.problems.append(("warning", "no box can be trained on"))
    order = {"error": 0, "warning": 1, "info": 2}
    report.problems = sorted(problems.render() + report.problems, key=lambda p: order[p[0]])
    return report


def _sampling(report: Report, labels: list[list[Any]], threshold: float, rule: str) -> None:
    """Fill the report's repeat-factor sampling rows from each image's category ids."""
    report.repeat_threshold, report.repeat_rule = threshold, rule
    factors = repeat_factors(labels, threshold, rule)  # (N,)
    r_c = class_repeat_factors(labels, threshold, rule)
    plain, sampled = expected_class_frequency(labels), expected_class_frequency(labels, factors)
    report.sampled_epoch_length = float(factors.sum())
    report.sampling = [
        {"id": cat["id"], "name": cat["name"], "repeat_factor": r_c.get(cat["id"], 1.0),
         "images_per_epoch": plain.get(cat["id"], (0.0, 0.0))[0], "share": plain.get(cat["id"], (0.0, 0.0))[1],
         "sampled_images_per_epoch": sampled.get(cat["id"], (0.0, 0.0))[0],
         "sampled_share": sampled.get(cat["id"], (0.0, 0.0))[1]}
        for cat in report.categories
    ]


def _check_image_files(
    checked: CocoValidation, image_dir: Path, workers: int | None, progress: bool | None, cache: bool
) -> None:
    """Decode every image of ``checked`` and add what is wrong with the files to its problems."""
    problems: Problems = checked.problems
    names = {image_id: str(img["file_name"]) for image_id, img in checked.images.items()}
    scans = scan_images(image_dir, names.values(), workers=workers, progress=progress, cache=cache)
    for image_id, img in checked.images.items():
        name = names[image_id]
        scan = scans[name]
        where = f"image {image_id} ({name})"
        if scan.status == "missing":
            problems.add("missing_file", f"image {image_id} ({image_dir / name})")
            continue
        if not scan.ok:
            problems.add("unreadable", f"{where}: {scan.error}")
            continue
        mismatch = scan.problem(img["height"], img["width"])
        if mismatch is not None:
            problems.add("size_mismatch", f"{where}: {mismatch}")
        if scan.truncated:
            problems.add("truncated", where)
        if scan.orientation != 1:
            problems.add("exif", f"{where}: orientation {scan.orientation}")
        if scan.conversion is not None:
            problems.add("conversion", f"{where}: {scan.conversion}")
        real = format_mismatch(name, scan)
        if real is not None:
            problems.add("format", f"{where}: {real}")
