"""Per-class score thresholds that maximise F1 at IoU 0.5 (``thresholds.json``).

The matching is COCOeval's own (greedy by score, one ground truth per detection, crowd
and out-of-range boxes ignored), taken per detection from ``COCOeval.evalImgs`` at IoU
0.5, area "all" and the evaluation's ``maxDets``: :func:`matches_at_iou50` extracts it,
:func:`f1_thresholds` sweeps the score threshold over it, :func:`load_thresholds` reads a
number or a written file back for ``predict``.

Because COCOeval matches detections in descending score order, the detections kept by a
threshold ``s`` are matched exactly as in the full run; so precision and recall at ``s``
are cumulative counts over the score-sorted detections, with no re-matching.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from focaldet.errors import ConfigError

ALL = "all"  # the key of the all-classes-together entry


@dataclass
class ClassMatches:
    """COCOeval's matching of one class at IoU 0.5, ignored detections removed.

    Attributes:
        scores: ``(D,)`` detection scores. tp: ``(D,)`` bool, matched to a ground truth.
        num_gt: non-ignored ground-truth boxes of the class.
    """

    scores: np.ndarray
    tp: np.ndarray
    num_gt: int


def matches_at_iou50(ev: Any, max_dets: int) -> list[ClassMatches]:
    """Per class (``ev.params.catIds`` order), the matching at IoU 0.5 of an evaluated COCOeval.

    ``ev`` is a pycocotools ``COCOeval`` after ``evaluate()`` whose ``params.iouThrs``
    contain 0.5 and whose ``params.areaRng`` starts with "all" (COCO's defaults).
    What ``accumulate()`` does for one (class, area "all", IoU 0.5, ``max_dets``) cell,
    kept per detection instead of turned into a curve.
    """
    p = ev.params
    t = int(np.argmin(np.abs(np.asarray(p.iouThrs) - 0.5)))
    if abs(p.iouThrs[t] - 0.5) > 1e-9:
        raise ValueError("COCOeval params.iouThrs has no 0.5")
    num_areas, num_images = len(p.areaRng), len(p.imgIds)
    out = []
    for k in range(len(p.catIds)):
        # evalImgs is flat (K, A, I); area 0 is "all"
        cells = [e for e in ev.evalImgs[k * num_areas * num_images:(k * num_areas + 1) * num_images] if e is not None]
        if not cells:
            out.append(ClassMatches(np.zeros(0), np.zeros(0, bool), 0))
            continue
        scores = np.concatenate([np.asarray(e["dtScores"][:max_dets], float) for e in cells])
        matched = np.concatenate([np.asarray(e["dtMatches"])[t, :max_dets] for e in cells]) > 0
        ignored = np.concatenate([np.asarray(e["dtIgnore"])[t, :max_dets] for e in cells]).astype(bool)
        num_gt = int(sum(int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)) for e in cells))
        keep = ~ignored
        out.append(ClassMatches(scores[keep], matched[keep], num_gt))
    return out


def best_f1(matches: ClassMatches) -> dict[str, float]:
    """The score threshold maximising F1 over ``matches``, with its precision, recall, F1.

    Candidates are the distinct detection scores (a threshold keeps detections scoring
    ``>= score``); ties in F1 go to the highest score. No detection or no ground truth:
    ``score`` is ``nan`` and the three numbers are 0.
    """
    if matches.num_gt == 0 or len(matches.scores) == 0:
        return {"score": math.nan, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    order = np.argsort(-matches.scores, kind="mergesort")
    scores, tp = matches.scores[order], matches.tp[order]
    ctp = np.cumsum(tp)  # (D,) true positives among the first i+1 detections
    kept = np.arange(1, len(scores) + 1)
    last_of_tie = np.r_[scores[1:] != scores[:-1], True]  # a threshold keeps a whole tie group
    precision, recall = ctp / kept, ctp / matches.num_gt
    f1 = np.where(ctp > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    f1 = np.where(last_of_tie, f1, -1.0)
    i = int(np.argmax(f1))  # first maximum = highest score
    return {"score": float(scores[i]), "precision": float(precision[i]), "recall": float(recall[i]),
            "f1": float(max(f1[i], 0.0))}


def f1_thresholds(per_class: Sequence[ClassMatches], class_names: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{name: best_f1(...), ..., "all": ...}``; "all" pools every class's detections and gt."""
    if len(per_class) != len(class_names):
        raise ValueError(f"{len(class_names)} class names for {len(per_class)} classes")
    out = {str(n): best_f1(m) for n, m in zip(class_names, per_class)}
    pooled = ClassMatches(np.concatenate([m.scores for m in per_class] or [np.zeros(0)]),
                          np.concatenate([m.tp for m in per_class] or [np.zeros(0, bool)]),
                          sum(m.num_gt for m in per_class))
    out[ALL] = best_f1(pooled)
    return out


def thresholds_table(thresholds: Mapping[str, Mapping[str, float]]) -> str:
    """The thresholds as an aligned text table (one row per class, then "all")."""
    width = max([5, *(len(n) for n in thresholds)])
    lines = [f"{'class':<{width}} {'score':>7} {'P':>7} {'R':>7} {'F1':>7}", "-" * (width + 32)]
    for name, t in thresholds.items():
        score = "-" if math.isnan(t["score"]) else f"{t['score']:.4f}"
        lines.append(f"{name:<{width}} {score:>7} {t['precision']:>7.4f} {t['recall']:>7.4f} {t['f1']:>7.4f}")
    return "\n".join(lines)


def write_thresholds(thresholds: Mapping[str, Mapping[str, float]], path: str | os.PathLike) -> Path:
    """Write ``thresholds.json`` (``nan`` scores as ``null``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {n: {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in t.items()}
             for n, t in thresholds.items()}
    path.write_text(json.dumps(clean, indent=2))
    return path


def load_thresholds(value: float | int | str | os.PathLike) -> float | dict[str, float]:
    """A score threshold for ``predict``: a number, or per class name from a ``thresholds.json``.

    ``value`` is a number (or a string of one), or the path of a file written by
    ``focaldet validate``; from a file, the per-class ``score`` entries are returned
    (the "all" entry too, used for classes without an entry of their own). Classes whose
    threshold could not be computed (``null``) are left out. Raises ``ConfigError``
    naming the file when it is missing or malformed.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value)
    try:
        return float(text)
    except ValueError:
        pass
    path = Path(text)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: score threshold file not found (pass a number or a thresholds.json)") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a readable thresholds JSON ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(f"{path}: expected {{class name: {{\"score\": ...}}}} as written by focaldet validate")
    out = {}
    for name, entry in data.items():
        score = entry.get("score")
        if score is None:
            continue
        if not isinstance(score, (int, float)) or isinstance(score, bool):
            raise ConfigError(f"{path}: class {name!r} has a non-numeric score {score!r}")
        out[str(name)] = float(score)
    return out


def per_label_thresholds(threshold: float | Mapping[str, float], class_names: Sequence[str],
                         default: float = 0.0) -> np.ndarray:
    """``(K,)`` score threshold of each contiguous label: a number for all, or looked up by
    name (falling back to the "all" entry, then to ``default``)."""
    if isinstance(threshold, (int, float)):
        return np.full(len(class_names), float(threshold))
    fallback = threshold.get(ALL, default)
    return np.asarray([threshold.get(str(n), fallback) for n in class_names], dtype=float)
