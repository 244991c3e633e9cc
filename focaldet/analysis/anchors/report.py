"""A dataset's anchor analysis: what ``focaldet data anchors`` reads, prints and writes."""

from __future__ import annotations

import math
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from focaldet.analysis.anchors.fit import AnchorFit, fit_anchors, generator_args
from focaldet.analysis.anchors.geometry import AnchorReport, best_possible_recall, input_boxes
from focaldet.errors import ConfigError, DataError
from focaldet.config.inputs import InputSettings
from focaldet.modeling.anchors import AnchorGenerator
from focaldet.config.recipe import read_config_file


# --------------------------------------------------------------------------------------
# A dataset's analysis (what ``focaldet data anchors`` prints)
# --------------------------------------------------------------------------------------


@dataclass
class DatasetBoxes:
    """The trainable boxes of a COCO file (non-crowd, clipped, larger than ``MIN_BOX_SIDE``:
    the loader's rules) with their image sizes."""

    boxes: Tensor  # (G, 4) float32 xyxy, original pixels
    image_sizes: Tensor  # (G, 2) int64 (H, W) of each box's image
    num_images: int
    file_names: list[str]  # of every valid image entry


def read_boxes(ann_file: str | Path) -> DatasetBoxes:
    """Read and validate a COCO instances JSON (`focaldet.data.validate`, as the loader does);
    `DataError` naming the file for a missing or malformed file, invalid entries or no
    trainable box."""
    from focaldet.data.coco import read_coco_json
    from focaldet.data.validate import validate_coco

    checked = validate_coco(read_coco_json(ann_file))
    errors = checked.problems.errors
    if errors:
        raise DataError(f"{ann_file}: {' | '.join(errors)}")
    boxes, sizes = [], []
    for image_id, items in checked.boxes.items():
        image = checked.images[image_id]
        for _, _, box in items:
            boxes.append(box)
            sizes.append((int(image["height"]), int(image["width"])))
    if not boxes:
        raise DataError(f"{ann_file}: no boxes to fit anchors to ({len(checked.images)} images, "
                        f"{checked.num_boxes} boxes of which none is trainable: crowd or at most 1 px)")
    return DatasetBoxes(torch.tensor(boxes, dtype=torch.float32), torch.tensor(sizes, dtype=torch.int64),
                        len(checked.images), [str(img["file_name"]) for img in checked.images.values()])


def check_image_files(image_dir: str | Path, file_names: Sequence[str]) -> None:
    """`DataError` when ``image_dir`` is not a folder or lacks files of ``file_names`` (only
    their existence is checked; ``focaldet data check`` decodes them)."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise DataError(f"image folder {image_dir} does not exist")
    missing = [name for name in file_names if not (image_dir / name).is_file()]
    if missing:
        more = f", ... ({len(missing) - 5} more)" if len(missing) > 5 else ""
        raise DataError(f"{image_dir}: {len(missing)} of {len(file_names)} image files are missing: "
                        f"{', '.join(missing[:5])}{more}")


def read_anchor_config(path: str | Path) -> tuple[AnchorGenerator | None, dict[str, Any]]:
    """``(model.model.anchor_generator or None, data arguments)`` of a focaldet YAML config;
    `ConfigError` for a missing file, invalid YAML or an anchor generator that cannot be built."""
    cfg = read_config_file(path)

    def section(name: str) -> dict:
        value = cfg.get(name) or {}
        if isinstance(value, dict) and "class_path" in value:
            value = value.get("init_args") or {}
        return dict(value) if isinstance(value, dict) else {}

    data = {k: v for k, v in section("data").items() if k in ("min_size", "max_size", "size_divisibility",
                                                               "eval_transforms")}
    model = section("model").get("model") or {}
    if isinstance(model, dict) and "class_path" in model:  # model: {class_path: focaldet.models.RetinaNet, init_args: ...}
        model = model.get("init_args") or {}
    spec = model.get("anchor_generator") if isinstance(model, dict) else None
    if spec is None:
        return None, data
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: model.model.anchor_generator is not a mapping")
    class_path = str(spec.get("class_path", "AnchorGenerator"))
    if class_path.rsplit(".", 1)[-1] != "AnchorGenerator":
        raise ConfigError(f"{path}: model.model.anchor_generator.class_path {class_path} is not an AnchorGenerator")
    try:
        return AnchorGenerator(**(spec.get("init_args") or {})), data
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: model.model.anchor_generator: {e}") from None


@dataclass
class AnchorAnalysis:
    """The current anchors' BPR and the fitted ones' on a dataset (`analyse_anchors`)."""

    ann_file: str
    settings: InputSettings
    num_images: int
    current: AnchorReport
    current_generator: AnchorGenerator
    fit: AnchorFit
    seconds: float  # the fit (and the reports)
    default_sizes: bool = False  # settings are InputSettings' defaults, not the user's (says so in format)

    def yaml(self) -> str:
        """The block to paste into a config."""
        args = ", ".join(f"{k}: {_yaml_value(v)}" for k, v in self.fit.init_args().items())
        return ("model:\n  model:\n    anchor_generator:\n      class_path: focaldet.models.AnchorGenerator\n"
                f"      init_args: {{{args}}}\n")

    def to_dict(self) -> dict[str, Any]:
        g = self.fit.generator
        return {
            "annotations": self.ann_file,
            "min_size": self.settings.min_size,
            "max_size": self.settings.max_size,
            "size_divisibility": self.settings.size_divisibility,
            "num_images": self.num_images,
            "num_boxes": self.current.num_boxes,
            "num_anchors_per_location": g.num_anchors,
            "current": {"init_args": generator_args(self.current_generator), **self.current.to_dict()},
            "fitted": {"init_args": self.fit.init_args(), **self.fit.report.to_dict(),
                       "sample": self.fit.sample.to_dict(),
                       "unreachable_in_sample": self.fit.unreachable, "ceiling_in_sample": self.fit.ceiling,
                       "candidates_scored": self.fit.evaluations},
            "seconds": self.seconds,
        }

    def format(self) -> str:
        cur, fit, f, g = self.current, self.fit.report, self.fit, self.fit.generator
        s = self.settings
        size = "not resized" if s.min_size is None else f"resized to min_size {s.min_size}, max_size {s.max_size}"
        sampled = f.num_sample < fit.num_boxes
        lines = [
            f"focaldet data anchors: {self.ann_file}",
            f"  {cur.num_boxes} boxes in {self.num_images} images, {size}, "
            f"padded to a multiple of {s.size_divisibility}",
        ]
        if self.default_sizes:
            lines.append("  (the default sizes: give your training sizes with --min-size/--max-size or -c CONFIG)")
        lines += [
            f"  BPR (best possible recall): share of boxes with an anchor at IoU >= {cur.iou_threshold:g}",
            "",
            f"  {'':<15}{'BPR':>8}{'mean best IoU':>15}  | boxes per level (of their best anchor)",
            f"  {'':<15}{'':>8}{'':>15}  |" + "".join(f"{'P' + str(int(math.log2(st))):>7}" for st in cur.strides),
        ]
        rows = [("current", cur), ("fitted", fit)] + ([("fitted, sample", f.sample)] if sampled else [])
        for name, r in rows:
            lines.append(f"  {name:<15}{_pct(r.bpr):>8}{r.mean_best_iou:>15.3f}  |"
                         + "".join(f"{100 * v:>6.1f}%" for v in r.level_share))
        bins = [f"{lo:g}-{hi:g}" if not math.isinf(hi) else f">={lo:g}" for lo, hi, _, _ in cur.misses_by_size]
        lines += ["", "  missed / boxes, by sqrt(area) in input px:",
                  f"  {'':<15}" + "".join(f"{b:>11}" for b in bins)]
        for name, r in rows[:2]:
            lines.append(f"  {name:<15}" + "".join(f"{f'{m}/{n}':>11}" for _, _, n, m in r.misses_by_size))
        missed = round((1 - f.sample.bpr) * f.num_sample)
        lines.append("")
        if missed:
            lines += _wrap(
                f"{f.unreachable} of the {missed} boxes the fitted anchors miss{' in the sample' if sampled else ''} "
                f"cannot reach IoU {cur.iou_threshold:g} with any anchor shape at their nearest anchor centres "
                f"(strides {g.strides[0]}-{g.strides[-1]} px, offset {g.offset:g}): small and far from every centre; "
                f"no anchors on this grid exceed {_pct(f.ceiling)}")
        same = g.num_anchors == self.current_generator.num_anchors
        lines += _wrap(
            f"fit: {f.evaluations} candidate anchor sets scored on {f.num_sample} boxes in {self.seconds:.1f} s; "
            f"A = {g.num_anchors} anchors per location ({len(g.scales)} scales x {len(g.aspect_ratios)} aspect ratios)"
            + (", as now: the head's shapes (and pretrained head weights) still fit" if same else ""))
        if g is self.current_generator:
            lines.append("  the current anchors are the best found: nothing to change")
        lines += ["", "paste into your config (replaces model.model.anchor_generator):", self.yaml().rstrip()]
        return "\n".join(lines)


def _wrap(text: str) -> list[str]:
    return textwrap.wrap(text, width=100, initial_indent="  ", subsequent_indent="    ")


def _yaml_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_yaml_value(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v)


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%"


def analyse_anchors(
    ann_file: str | Path,
    settings: InputSettings,
    current: AnchorGenerator | None = None,
    sample_size: int = 5000,
    seed: int = 0,
    data: DatasetBoxes | None = None,
) -> AnchorAnalysis:
    """BPR of ``current`` (default `AnchorGenerator()`, COCO's anchors) on ``ann_file``'s boxes
    at ``settings``, and anchors fitted to them (`fit_anchors`)."""
    t0 = time.perf_counter()
    data = data if data is not None else read_boxes(ann_file)
    current = current if current is not None else AnchorGenerator()
    inputs = input_boxes(data.boxes, data.image_sizes, settings)
    report = best_possible_recall(inputs, None, current)
    fit = fit_anchors(inputs, None, start=current, sample_size=sample_size, seed=seed)
    return AnchorAnalysis(str(ann_file), settings, data.num_images, report, current, fit, time.perf_counter() - t0)
