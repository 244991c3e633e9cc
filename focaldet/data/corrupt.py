"""Noisy copies of a COCO dataset for robustness studies (``focaldet data corrupt``):
flipped labels, dropped boxes, jittered boxes.

Deterministic given the seed, and with EXACT counts: ``drop_boxes = P`` removes
``round(P * N)`` of the N non-crowd annotations, ``flip_labels = P`` relabels
``round(P * kept)`` of those kept, each to a uniformly random OTHER category. Each kind of
noise draws from its own random stream, so for one seed the boxes flipped at 20 % are among
those flipped at 40 %. ``jitter_boxes = S`` moves each edge of every kept box by a normal
offset of standard deviation ``S`` times the box's width (x edges) or height (y edges),
clipped to the image and at least 1 px wide. Crowd annotations are left as they are;
everything else in the JSON (images, categories, info, other fields) is kept.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from focaldet.data.coco import read_coco_json
from focaldet.errors import ConfigError, DataError

__all__ = ["CorruptionSummary", "corrupt_coco", "corrupt_file"]

_STREAMS = {"drop": 0, "flip": 1, "flip_to": 2, "jitter": 3}


@dataclass
class CorruptionSummary:
    """What ``corrupt_coco`` changed (annotation ids refer to the input file)."""

    seed: int
    flip_labels: float
    drop_boxes: float
    jitter_boxes: float
    annotations: int  # in the input
    crowd: int  # left untouched
    dropped: list = field(default_factory=list)  # ids
    flipped: list = field(default_factory=list)  # [id, old category_id, new category_id]
    jittered: int = 0
    jitter_mean_iou: float | None = None  # mean IoU of jittered boxes with their originals

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        lines = [f"{self.annotations} annotations ({self.crowd} crowd, untouched); seed {self.seed}",
                 f"dropped {len(self.dropped)} (--drop-boxes {self.drop_boxes})",
                 f"flipped {len(self.flipped)} labels (--flip-labels {self.flip_labels})",
                 f"jittered {self.jittered} boxes (--jitter-boxes {self.jitter_boxes})"
                 + (f", mean IoU with the original {self.jitter_mean_iou:.3f}" if self.jitter_mean_iou is not None else "")]
        return "\n".join(lines)


def _rng(seed: int, stream: str) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAMS[stream]])


def _check_fraction(name: str, value: float) -> None:
    if not (0.0 <= value <= 1.0) or math.isnan(value):
        raise ConfigError(f"--{name} must be a fraction in [0, 1], got {value}")


def _xyxy_iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _jitter_edges(lo: float, hi: float, noise: tuple[float, float], limit: float | None) -> tuple[float, float]:
    """Edges ``lo < hi`` moved by ``noise * (hi - lo)``, ordered, clipped to ``[0, limit]``, >= 1 px apart."""
    size = hi - lo
    a, b = sorted((lo + noise[0] * size, hi + noise[1] * size))
    if limit is not None:
        a, b = min(max(a, 0.0), limit), min(max(b, 0.0), limit)
    if b - a < 1.0:  # collapsed: 1 px around its centre, inside the image
        c = (a + b) / 2
        a, b = c - 0.5, c + 0.5
        if limit is not None and limit >= 1.0:
            shift = max(0.0, -a) - max(0.0, b - limit)
            a, b = a + shift, b + shift
    return a, b


def corrupt_coco(data: dict, flip_labels: float = 0.0, drop_boxes: float = 0.0, jitter_boxes: float = 0.0,
                 seed: int = 0, source: str = "dataset") -> tuple[dict, CorruptionSummary]:
    """A noisy copy of the COCO dict ``data`` (not modified) and what changed (module docstring)."""
    _check_fraction("flip-labels", flip_labels)
    _check_fraction("drop-boxes", drop_boxes)
    if not 0.0 <= jitter_boxes < float("inf"):
        raise ConfigError(f"--jitter-boxes must be >= 0 and finite (in units of box size), got {jitter_boxes}")
    out = json.loads(json.dumps(data))  # a deep copy of plain JSON
    anns = out["annotations"]
    cat_ids = [c["id"] for c in out["categories"]]
    sizes = {img["id"]: (img.get("width"), img.get("height")) for img in out["images"] if isinstance(img, dict)}
    eligible = [i for i, a in enumerate(anns) if not a.get("iscrowd", 0)]
    summary = CorruptionSummary(seed, flip_labels, drop_boxes, jitter_boxes, len(anns), len(anns) - len(eligible))

    n_drop = round(drop_boxes * len(eligible))
    order = _rng(seed, "drop").permutation(len(eligible))
    drop = {eligible[j] for j in order[:n_drop]}
    kept = [i for i in eligible if i not in drop]
    summary.dropped = sorted(anns[i].get("id") for i in drop)

    n_flip = round(flip_labels * len(kept))
    if n_flip and len(cat_ids) < 2:
        raise DataError(f"{source}: cannot flip labels with {len(cat_ids)} category: there is no other class")
    order = _rng(seed, "flip").permutation(len(kept))
    flip_to = _rng(seed, "flip_to").integers(0, max(len(cat_ids) - 1, 1), size=len(kept))
    for j in order[:n_flip]:
        a = anns[kept[j]]
        if a["category_id"] not in cat_ids:
            raise DataError(f"{source}: annotation {a.get('id')} has unknown category_id {a['category_id']}")
        others = [c for c in cat_ids if c != a["category_id"]]
        new = others[int(flip_to[j])]
        summary.flipped.append([a.get("id"), a["category_id"], new])
        a["category_id"] = new
    summary.flipped.sort(key=lambda f: (f[0] is None, f[0]))

    if jitter_boxes > 0:
        noise = _rng(seed, "jitter").normal(0.0, jitter_boxes, size=(len(kept), 4))
        ious = []
        for j, i in enumerate(kept):
            a = anns[i]
            x, y, w, h = (float(v) for v in a["bbox"])
            width, height = sizes.get(a["image_id"], (None, None))
            x1, x2 = _jitter_edges(x, x + w, noise[j, :2], width)
            y1, y2 = _jitter_edges(y, y + h, noise[j, 2:], height)
            ious.append(_xyxy_iou((x, y, x + w, y + h), (x1, y1, x2, y2)))
            if math.isclose(float(a.get("area", -1)), w * h, rel_tol=1e-6):
                a["area"] = (x2 - x1) * (y2 - y1)  # a box area: keep it the box's
            a["bbox"] = [x1, y1, x2 - x1, y2 - y1]
        summary.jittered = len(kept)
        summary.jitter_mean_iou = float(np.mean(ious)) if ious else None

    out["annotations"] = [a for i, a in enumerate(anns) if i not in drop]
    return out, summary


def corrupt_file(ann: str | Path, out: str | Path, flip_labels: float = 0.0, drop_boxes: float = 0.0,
                 jitter_boxes: float = 0.0, seed: int = 0) -> tuple[CorruptionSummary, Path]:
    """Write the noisy copy of ``ann`` to ``out`` and its summary to ``OUT.summary.json``;
    returns the summary and the summary's path."""
    from focaldet.output_paths import check_output_file

    ann, out = Path(ann), Path(out)
    if out.resolve() == ann.resolve():
        raise ConfigError(f"{out}: --out must not be the input annotation file")
    summary_path = out.with_name(out.stem + ".summary.json")
    check_output_file(out, "--out")  # before the work, not a traceback after it
    check_output_file(summary_path, "--out summary")
    corrupt_coco({"annotations": [], "categories": [], "images": []}, flip_labels, drop_boxes, jitter_boxes, seed)
    data = read_coco_json(ann)
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or "category_id" not in a or not isinstance(a.get("bbox"), list) \
                or len(a["bbox"]) != 4:
            raise DataError(f"{ann}: annotations[{i}] needs 'category_id' and a 4-number 'bbox': {a!r}")
    noisy, summary = corrupt_coco(data, flip_labels, drop_boxes, jitter_boxes, seed, source=str(ann))
    try:
        out.write_text(json.dumps(noisy))
    except OSError as e:  # e.g. the disk filled up
        raise ConfigError(f"--out {out}: cannot write ({e.strerror or e})") from None
    summary_path.write_text(json.dumps({"source": str(ann), **summary.to_dict()}, indent=1))
    return summary, summary_path
