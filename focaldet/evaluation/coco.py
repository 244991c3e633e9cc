"""COCO-style bbox evaluation: result conversion, multi-process gathering, metrics, plots.

Detections arrive as torchvision-style dicts (``boxes`` xyxy in original image pixels,
``scores``, contiguous ``labels``); :func:`detections_to_coco` turns them into COCO result
entries, :func:`evaluate_coco` runs ``COCOeval`` (pycocotools, or faster-coco-eval's C++
port, which gives the same numbers) and :func:`evaluate_distributed` does the same in a
``torch.distributed`` run, so that N processes report exactly what one process would.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from focaldet.errors import ConfigError
from focaldet.structures.boxes import xyxy_to_xywh

STAT_NAMES = ("mAP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
BACKENDS = ("pycocotools", "faster_coco_eval")
DEFAULT_BACKEND = "faster_coco_eval"  # the same numbers as pycocotools (tested), ~10x faster
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # COCOeval's default params.iouThrs
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)  # COCOeval's default params.recThrs
BOX_DECIMALS = 3  # 1/1000 pixel: invisible to IoU, keeps the JSON small
SCORE_DECIMALS = 5


# --------------------------------------------------------------------------- conversion


def detections_to_coco(
    image_ids: Sequence[int] | torch.Tensor,
    detections: Sequence[dict[str, torch.Tensor]],
    label_to_cat_id: Sequence[int],
) -> list[dict[str, Any]]:
    """Convert per-image detections into COCO results entries.

    Args:
        image_ids: the dataset image id of each image, in the order of ``detections``.
        detections: per image ``{"boxes": (M, 4) xyxy, "scores": (M,), "labels": (M,)}``,
            boxes in original image pixels, labels contiguous ``0..K-1``.
        label_to_cat_id: ``label_to_cat_id[label]`` is the dataset's category id.

    Returns:
        ``[{"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float}]``,
        the entries of one image contiguous and in input order (what
        :func:`merge_rank_results` relies on). Boxes are rounded to 1/1000 pixel and scores
        to 5 decimals; all values are plain Python numbers.
    """
    image_ids = [int(i) for i in image_ids]
    if len(image_ids) != len(detections):
        raise ValueError(f"{len(image_ids)} image ids for {len(detections)} detection dicts")
    if not detections:
        return []
    lut = torch.as_tensor(list(label_to_cat_id), dtype=torch.int64)
    counts = [len(d["scores"]) for d in detections]
    boxes = torch.cat([d["boxes"].detach().reshape(-1, 4).double().cpu() for d in detections])
    scores = torch.cat([d["scores"].detach().reshape(-1).double().cpu() for d in detections])
    labels = torch.cat([d["labels"].detach().reshape(-1).long().cpu() for d in detections])
    if labels.numel() and (labels.min() < 0 or labels.max() >= len(lut)):
        raise ValueError(f"labels must lie in [0, {len(lut)}), got {labels.min()}..{labels.max()}")

    img = torch.repeat_interleave(torch.tensor(image_ids, dtype=torch.int64), torch.tensor(counts))
    xywh = xyxy_to_xywh(boxes).round(decimals=BOX_DECIMALS).tolist()
    return [
        {"image_id": i, "category_id": c, "bbox": b, "score": s}
        for i, c, b, s in zip(
            img.tolist(), lut[labels].tolist(), xywh, scores.round(decimals=SCORE_DECIMALS).tolist()
        )
    ]


# --------------------------------------------------------------------------- gathering


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def merge_rank_results(per_rank: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Concatenate the per-rank result lists, keeping each image's entries only once.

    ``DistributedSampler`` pads the last batch with repeated images, so the same image can
    be evaluated on two ranks. Each rank's list holds every image's entries as one
    contiguous run (as :func:`detections_to_coco` emits them); the first run seen for an
    image id (lowest rank, earliest position) is kept and any later run of that id, on
    another rank or on the same one, is dropped.
    """
    seen: set[int] = set()
    merged: list[dict[str, Any]] = []
    for results in per_rank:
        run_image, keep = None, False
        for entry in results:
            image_id = entry["image_id"]
            if image_id != run_image:  # a new run of one image's entries starts
                run_image, keep = image_id, image_id not in seen
                seen.add(image_id)
            if keep:
                merged.append(entry)
    return merged


def gather_results(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """All ranks' results, de-duplicated by image id (see :func:`merge_rank_results`).

    In a ``torch.distributed`` run this is a collective (``all_gather_object``): every
    rank must call it, and every rank gets the full merged list. Otherwise the local list
    is only de-duplicated.
    """
    if not _distributed():
        return merge_rank_results([results])
    per_rank: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, list(results))
    return merge_rank_results(per_rank)


# --------------------------------------------------------------------------- evaluation


@dataclass
class CocoEvalResult:
    """Outcome of one COCO bbox evaluation.

    Attributes:
        stats: the 12 ``COCOeval.summarize()`` numbers under :data:`STAT_NAMES`, in [0, 1].
            As in COCOeval, ``-1.0`` means "not computable" (e.g. ``APs`` when the ground
            truth has no small objects).
        per_class: class name -> AP@[.5:.95], computed like detectron2's
            ``_derive_coco_results`` (mean over the precision entries > -1); ``nan`` when
            the class has no ground truth in the evaluated images.
        per_class_ap50: class name -> AP@.5, same rules.
        num_gt: class name -> number of non-crowd ground-truth boxes evaluated.
        precision: COCOeval's ``eval["precision"]`` array ``(T, R, K, A, M)`` for plots
            (IoU thresholds, recall thresholds, classes, area ranges, max detections).
        class_names: names in category-id order (the K axis of ``precision``).
        scores: COCOeval's ``eval["scores"]`` array, same shape: the score at which each
            precision entry is reached.
        matches: per class, COCOeval's per-detection matching at IoU 0.5, area "all",
            ``max_dets`` (:class:`~focaldet.evaluation.thresholds.ClassMatches`): what the
            F1 thresholds are computed from.
        max_dets: the largest ``params.maxDets`` (COCO's 100 by default); ``AR100`` and
            the APs are computed at this many detections per image.
    """

    stats: dict[str, float]
    per_class: dict[str, float]
    per_class_ap50: dict[str, float]
    num_gt: dict[str, int]
    precision: np.ndarray | None = field(default=None, repr=False)
    class_names: list[str] = field(default_factory=list)
    scores: np.ndarray | None = field(default=None, repr=False)
    matches: list | None = field(default=None, repr=False)
    max_dets: int = 100

    def table(self) -> str:
        """The 12 summary numbers as an aligned two-column text table."""
        lines = [f"{'metric':<7} {'value':>7}", "-" * 15]
        lines += [f"{k:<7} {_fmt(v):>7}" for k, v in self.stats.items()]
        return "\n".join(lines)

    def per_class_table(self) -> str:
        """Per-class AP@[.5:.95], AP@.5 and ground-truth box count as a text table."""
        width = max([5, *(len(n) for n in self.class_names)])
        lines = [f"{'class':<{width}} {'AP':>7} {'AP50':>7} {'#gt':>7}", "-" * (width + 24)]
        for name in self.class_names:
            ap, ap50, n = self.per_class[name], self.per_class_ap50[name], self.num_gt[name]
            lines.append(f"{name:<{width}} {_fmt(ap):>7} {_fmt(ap50):>7} {n:>7d}")
        return "\n".join(lines)


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) or value < 0 else f"{value:.4f}"


def _noop(*args: Any, **kwargs: Any) -> None:
    pass


def _backend_classes(backend: str):
    """``(COCO, COCOeval, extra COCOeval kwargs)`` of a backend."""
    name = backend.replace("-", "_")
    if name == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval, {}
    if name == "faster_coco_eval":
        try:
            from faster_coco_eval import COCO as FCOCO
            from faster_coco_eval import COCOeval_faster
        except ImportError as e:
            raise ConfigError("backend 'faster_coco_eval' needs `pip install faster-coco-eval`") from e
        return FCOCO, COCOeval_faster, {"print_function": _noop}
    raise ConfigError(f"unknown COCO eval backend {backend!r}; choose one of {BACKENDS}")


def _to_backend_coco(coco_gt: Any, coco_cls: type) -> Any:
    """``coco_gt`` (a COCO object of either library, or a JSON path) as a ``coco_cls``."""
    if isinstance(coco_gt, coco_cls):
        return coco_gt
    if isinstance(coco_gt, (str, os.PathLike)):
        with open(coco_gt) as f:
            dataset = json.load(f)
    else:
        dataset = coco_gt.dataset
    gt = coco_cls()
    gt.dataset = dataset
    gt.createIndex()
    return gt


def _empty_results_coco(coco_gt: Any, coco_cls: type) -> Any:
    """A detections COCO with no annotations (pycocotools' ``loadRes([])`` crashes)."""
    dt = coco_cls()
    dt.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": list(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    dt.createIndex()
    return dt


def _results_coco(coco_gt: Any, results: Sequence[dict[str, Any]], coco_cls: type) -> Any:
    """``coco_gt.loadRes(results)`` for boxes, without the polygon of each box that
    ``loadRes`` adds (bbox evaluation never reads it): ids ``1..N`` in input order,
    ``area = w * h``, ``iscrowd = 0``. A result on an image the ground truth lacks raises
    ``ValueError`` naming it (``loadRes`` asserts)."""
    known = coco_gt.imgs
    anns = []
    gc_was_on = gc.isenabled()
    gc.disable()  # 100k+ new dicts: the collector's full passes would cost more than the loop
    try:
        for i, r in enumerate(results):
            bbox = r["bbox"]
            anns.append({"id": i + 1, "image_id": r["image_id"], "category_id": r["category_id"], "bbox": bbox,
                         "score": r["score"], "area": bbox[2] * bbox[3], "iscrowd": 0})
    finally:
        if gc_was_on:
            gc.enable()
    missing = {a["image_id"] for a in anns} - known.keys()
    if missing:
        raise ValueError(f"results on {len(missing)} image id(s) the ground truth lacks, e.g. {min(missing)}")
    dt = coco_cls()
    dt.dataset = {"images": list(coco_gt.dataset["images"]), "categories": list(coco_gt.dataset["categories"]),
                  "annotations": anns}
    dt.createIndex()
    return dt


def evaluate_coco(
    coco_gt: Any,
    results: Sequence[dict[str, Any]],
    backend: str = DEFAULT_BACKEND,
    class_names: Sequence[str] | None = None,
    image_ids: Sequence[int] | None = None,
    max_dets: int = 100,
) -> CocoEvalResult:
    """Run COCO bbox evaluation of ``results`` against ``coco_gt``.

    Args:
        coco_gt: ground truth: a pycocotools or faster-coco-eval ``COCO`` object, or the
            path of an instances JSON. Converted to the backend's class when needed.
        results: COCO results entries (from :func:`detections_to_coco`); not modified.
            An empty list is evaluated as "no detections": AP/AR 0 wherever there is
            ground truth (and -1 where COCOeval cannot compute a number).
        backend: ``"faster_coco_eval"`` (default) or ``"pycocotools"`` (same numbers, slower).
        class_names: names in ascending category-id order; defaults to the ground truth's
            category names.
        image_ids: evaluate only these images (e.g. a smoke run over a subset); default all
            images of the ground truth, as COCOeval does.
        max_dets: detections per image evaluated (``params.maxDets = [1, 10, max_dets]``);
            COCO's 100 by default, more for crowded scenes. ``mAP`` and ``AR100`` are then
            at ``max_dets`` (the names stay). The model's own cap is
            ``PostProcess.detections_per_img``: raise both together.

    The libraries' progress prints are silenced. The per-detection matching at IoU 0.5
    (``matches``) comes from pycocotools' ``evalImgs``, or with faster-coco-eval (whose
    ``evalImgs`` stay in C++) from its ``eval["matched"]`` pairs
    (:func:`~focaldet.evaluation.fast_matching.matches_of_faster_eval`; tested equal).
    """
    from focaldet.evaluation.fast_matching import matches_of_faster_eval
    from focaldet.evaluation.thresholds import matches_at_iou50

    if int(max_dets) < 10:
        raise ConfigError(f"max_dets must be >= 10 (COCOeval also reports AR1 and AR10), got {max_dets}")
    max_dets = int(max_dets)
    coco_cls, eval_cls, eval_kwargs = _backend_classes(backend)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = _to_backend_coco(coco_gt, coco_cls)
        if results and coco_cls.__module__.startswith("faster_coco_eval"):
            dt = _results_coco(gt, results, coco_cls)
        elif results:
            dt = gt.loadRes([dict(r) for r in results])  # loadRes adds keys to the dicts
        else:
            dt = _empty_results_coco(gt, coco_cls)
        ev = eval_cls(gt, dt, iouType="bbox", **eval_kwargs)
        if image_ids is not None:
            ev.params.imgIds = sorted({int(i) for i in image_ids})
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        if backend.replace("-", "_") == "pycocotools":
            matches = matches_at_iou50(ev, max_dets)
        else:  # the C++ matching's pairs, no second run (focaldet/evaluation/fast_matching.py)
            matches = matches_of_faster_eval(ev, max_dets)

    cat_ids = list(ev.params.catIds)  # sorted, the K axis of the precision array
    if class_names is None:
        class_names = [gt.cats[c]["name"] for c in cat_ids]
    elif len(class_names) != len(cat_ids):
        raise ValueError(f"{len(class_names)} class names for {len(cat_ids)} categories")
    class_names = [str(n) for n in class_names]

    precision = np.asarray(ev.eval["precision"])
    scores = np.asarray(ev.eval["scores"])
    gt_anns = gt.loadAnns(gt.getAnnIds(imgIds=list(ev.params.imgIds)))
    gt_count = Counter(a["category_id"] for a in gt_anns if not a.get("iscrowd", 0))
    per_class, per_class_ap50, num_gt = {}, {}, {}
    for k, (name, cat_id) in enumerate(zip(class_names, cat_ids)):
        per_class[name] = _mean_valid(precision[:, :, k, 0, -1])
        per_class_ap50[name] = _mean_valid(precision[0, :, k, 0, -1])
        num_gt[name] = gt_count[cat_id]

    stats = {name: float(v) for name, v in zip(STAT_NAMES, ev.stats[: len(STAT_NAMES)])}
    if max_dets != 100:  # pycocotools' summarize() computes mAP at a hard-coded maxDets=100
        stats["mAP"] = _mean_valid(precision[:, :, :, 0, -1]) if (precision[:, :, :, 0, -1] > -1).any() else -1.0
    return CocoEvalResult(stats, per_class, per_class_ap50, num_gt, precision, class_names, scores, matches, max_dets)


def _mean_valid(precision: np.ndarray) -> float:
    """detectron2's per-class AP: mean of the precision entries that are not -1."""
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else float("nan")


def evaluate_distributed(
    coco_gt: Any,
    local_results: Sequence[dict[str, Any]],
    backend: str = DEFAULT_BACKEND,
    class_names: Sequence[str] | None = None,
    image_ids: Sequence[int] | None = None,
    results_path: str | os.PathLike | None = None,
    max_dets: int = 100,
) -> CocoEvalResult:
    """:func:`evaluate_coco` over the results of all ranks; every rank gets the result.

    With ``results_path``, the merged results are also written there (by rank 0) as a
    COCO results JSON.

    A collective in a ``torch.distributed`` run: results are gathered and de-duplicated on
    all ranks, evaluated on rank 0 only, and the :class:`CocoEvalResult` is broadcast, so
    that every rank logs the same numbers. An exception on rank 0 is re-raised on every
    rank instead of leaving the others waiting. Without distributed it is
    :func:`evaluate_coco` on the de-duplicated local results.
    """
    results = gather_results(local_results)

    def evaluate() -> CocoEvalResult:
        if results_path is not None:
            write_results_json(results, results_path)
        return evaluate_coco(coco_gt, results, backend, class_names, image_ids, max_dets)

    return on_rank_zero(evaluate)


def on_rank_zero(fn: Any) -> Any:
    """``fn()`` run on rank 0 and its result broadcast to every rank (a collective).

    An exception on rank 0 is re-raised on every rank instead of leaving the others
    waiting. Without distributed, just ``fn()``.
    """
    if not _distributed():
        return fn()
    payload: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            payload[0] = fn()
        except Exception as e:  # noqa: BLE001 - forwarded to every rank below
            payload[0] = e
    dist.broadcast_object_list(payload, src=0)
    if isinstance(payload[0], BaseException):
        raise payload[0]
    return payload[0]


# --------------------------------------------------------------------------- outputs


def write_results_json(results: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write COCO results to ``path`` atomically (`focaldet.atomic.atomic_write`)."""
    from focaldet.atomic import atomic_write

    path = Path(path)
    with atomic_write(path) as f:
        json.dump(list(results), f)
    return path


def plot_pr_curves(result: CocoEvalResult, path: str | os.PathLike, max_legend: int = 20) -> Path:
    """Save :func:`pr_curves_figure` as a PNG."""
    fig = pr_curves_figure(result, max_legend)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def pr_curves_figure(result: CocoEvalResult, max_legend: int = 20):
    """Precision-recall curves per class at IoU 0.5 and 0.75 (a matplotlib ``Figure``).

    Area "all", at most ``result.max_dets`` detections per image. Classes without ground
    truth are left out; the mean over classes is drawn in bold black. The legend lists at
    most ``max_legend`` classes.
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas

    if result.precision is None:
        raise ValueError("this CocoEvalResult carries no precision array")
    fig = Figure(figsize=(12, 5), dpi=100, layout="constrained")
    for ax, iou in zip(fig.subplots(1, 2), (0.5, 0.75)):
        t = int(np.argmin(np.abs(IOU_THRESHOLDS - iou)))
        curves = result.precision[t, :, :, 0, -1]  # (R, K)
        valid = [k for k in range(curves.shape[1]) if (curves[:, k] > -1).any()]
        for k in valid:
            name = result.class_names[k] if k < len(result.class_names) else str(k)
            ax.plot(RECALL_THRESHOLDS, curves[:, k], lw=1, label=f"{name} ({curves[:, k].mean():.3f})")
        if valid:
            mean = curves[:, valid].mean(axis=1)
            ax.plot(RECALL_THRESHOLDS, mean, "k", lw=2.5, label=f"mean ({mean.mean():.3f})")
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall", ylabel="precision", title=f"IoU={iou:.2f}")
        ax.grid(alpha=0.3)
        if 0 < len(valid) <= max_legend:
            ax.legend(fontsize="small", loc="lower left")
    fig.suptitle(f"Precision-recall (area all, maxDets {result.max_dets}): "
                 f"mAP={result.stats.get('mAP', float('nan')):.4f}")
    return fig
