"""The IoU-0.5 matching of a faster-coco-eval run, without running pycocotools again.

faster-coco-eval keeps COCOeval's per-image records (``evalImgs``) in C++, but its
matching step returns ``eval["matched"]``: ``{"<dt id>_<gt id>": iou}`` for every matched
detection (crowd boxes included, as in pycocotools' ``dtMatches``).
:func:`matched_at_iou50` reruns that C++ step at IoU 0.5, area "all", ``maxDets`` only,
on the IoU matrices already computed; :func:`matches_from_matched`
rebuilds from it, with flat numpy arrays, what
:func:`focaldet.evaluation.thresholds.matches_at_iou50` reads from pycocotools'
``evalImgs``: per class the scores of the non-ignored detections (the ``maxDets`` best of
each image, ties in input order), whether each is a true positive, and the number of
non-ignored ground-truth boxes. ``tests/test_fast_matching.py`` checks it equal to
pycocotools on random and adversarial cases (ties, crowd, the ``maxDets`` cut).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from focaldet.evaluation.thresholds import ClassMatches

AREA_ALL = (0.0, 1e5**2)  # COCOeval's area range "all"


def _ann_arrays(anns: Mapping[int, Mapping[str, Any]], keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Columns of a COCO ``anns`` dict (id -> annotation) as arrays, in id order."""
    values = list(anns.values())
    cols = {"id": np.fromiter((a["id"] for a in values), np.int64, len(values))}
    for key in keys:
        if key == "iscrowd":
            cols[key] = np.fromiter((bool(a.get("iscrowd", 0)) for a in values), bool, len(values))
        elif key in ("score", "area"):
            cols[key] = np.fromiter((float(a.get(key, 0.0)) for a in values), np.float64, len(values))
        else:
            cols[key] = np.fromiter((a[key] for a in values), np.int64, len(values))
    order = np.argsort(cols["id"], kind="stable")
    return {k: v[order] for k, v in cols.items()}


def matches_from_matched(
    matched: Mapping[str, float],
    gt_anns: Mapping[int, Mapping[str, Any]],
    dt_anns: Mapping[int, Mapping[str, Any]],
    img_ids: Sequence[int],
    cat_ids: Sequence[int],
    max_dets: int,
) -> list[ClassMatches]:
    """Per class (``cat_ids`` order), COCOeval's matching at IoU 0.5, area "all", ``max_dets``.

    Args:
        matched: faster-coco-eval's ``eval["matched"]`` (``"dtid_gtid" -> iou``).
        gt_anns, dt_anns: the ``anns`` dicts of the ground-truth and results COCO objects.
        img_ids, cat_ids: the evaluated images and categories (``params.imgIds/catIds``).
        max_dets: detections kept per image and category, best scores first.

    Same content and order as ``matches_at_iou50`` of a pycocotools run: per class, images
    in ``img_ids`` order, each image's detections by descending score (stable).
    """
    cat_ids = [int(c) for c in cat_ids]
    img_pos = {int(i): p for p, i in enumerate(img_ids)}
    cat_pos = {c: k for k, c in enumerate(cat_ids)}
    gt = _ann_arrays(gt_anns, ("image_id", "category_id", "iscrowd", "area"))
    dt = _ann_arrays(dt_anns, ("image_id", "category_id", "score", "area"))

    def positions(col: np.ndarray, pos: dict[int, int]) -> np.ndarray:
        return np.fromiter((pos.get(int(v), -1) for v in col), np.int64, len(col))

    # ground truth: counted when evaluated, not crowd and inside the "all" area range
    g_img, g_cat = positions(gt["image_id"], img_pos), positions(gt["category_id"], cat_pos)
    g_eval = (g_img >= 0) & (g_cat >= 0)
    g_ignore = gt["iscrowd"] | (gt["area"] < AREA_ALL[0]) | (gt["area"] > AREA_ALL[1])
    num_gt = np.bincount(g_cat[g_eval & ~g_ignore], minlength=len(cat_ids))  # (K,)

    # detections: the evaluated ones, ordered (class, image, -score, id); max_dets per cell
    d_img, d_cat = positions(dt["image_id"], img_pos), positions(dt["category_id"], cat_pos)
    keep = (d_img >= 0) & (d_cat >= 0)
    ids, d_img, d_cat = dt["id"][keep], d_img[keep], d_cat[keep]
    score, area = dt["score"][keep], dt["area"][keep]
    order = np.lexsort((ids, -score, d_img, d_cat))  # last key first: class, image, -score, id
    ids, d_img, d_cat, score, area = ids[order], d_img[order], d_cat[order], score[order], area[order]
    cell = d_cat * len(img_pos) + d_img  # (D,) one cell per (class, image)
    new_cell = np.r_[True, cell[1:] != cell[:-1]]
    start = np.maximum.accumulate(np.where(new_cell, np.arange(len(cell)), 0))
    rank = np.arange(len(cell)) - start  # (D,) position within its cell
    cut = rank < max_dets
    ids, d_cat, score, area = ids[cut], d_cat[cut], score[cut], area[cut]

    # the matched gt of each detection (0: none)
    pairs = np.array([k.split("_", 1) for k in matched], dtype=np.int64).reshape(-1, 2)  # (M, 2) dt id, gt id
    gt_of = dict(zip(pairs[:, 0].tolist(), pairs[:, 1].tolist()))
    match_gt = np.fromiter((gt_of.get(int(i), 0) for i in ids), np.int64, len(ids))
    gt_row = np.searchsorted(gt["id"], match_gt)  # valid where match_gt > 0
    gt_row = np.minimum(gt_row, max(len(gt["id"]) - 1, 0))
    is_match = match_gt > 0
    matched_ignored = np.zeros(len(ids), bool)
    if len(gt["id"]):
        matched_ignored = is_match & g_ignore[gt_row]
    outside = (area < AREA_ALL[0]) | (area > AREA_ALL[1])
    ignored = matched_ignored | (~is_match & outside)  # pycocotools' dtIgnore
    tp = is_match & ~ignored

    out = []
    bounds = np.searchsorted(d_cat[~ignored], np.arange(len(cat_ids) + 1))
    s_kept, tp_kept = score[~ignored], tp[~ignored]
    for k in range(len(cat_ids)):
        lo, hi = bounds[k], bounds[k + 1]
        out.append(ClassMatches(s_kept[lo:hi].copy(), tp_kept[lo:hi].copy(), int(num_gt[k])))
    return out


def matched_at_iou50(ev: Any, max_dets: int) -> dict[str, float]:
    """``{"dtid_gtid": iou}``: the matching at IoU 0.5, area "all", ``max_dets`` of an
    evaluated ``COCOeval_faster``.

    Its own ``eval["matched"]`` is the union over every IoU threshold and area range (a
    box taken at 0.5 by one detection can go to another at 0.75), so the C++ matching is
    run once more on the IoU matrices the evaluation already computed (``ev.ious``), with
    one IoU threshold, one area range and one ``maxDets``: no IoU is recomputed, and only the
    detections with an IoU >= 0.5 somewhere in their (image, class) cell are passed in.
    """
    import faster_coco_eval.faster_eval_api_cpp as _C

    p = copy.deepcopy(ev.params)
    t = int(np.argmin(np.abs(np.asarray(p.iouThrs) - 0.5)))
    if abs(float(p.iouThrs[t]) - 0.5) > 1e-9 or list(p.areaRng[0]) != [0, 1e10] or max(p.maxDets) != max_dets:
        raise ValueError("the evaluation needs IoU 0.5, area range 'all' first and maxDets up to max_dets")
    p.iouThrs = np.array([0.5])
    p.areaRng, p.areaRngLbl, p.maxDets = [list(p.areaRng[0])], [p.areaRngLbl[0]], [int(max_dets)]
    if not p.useCats:
        ious = [[ev.ious[img, -1]] for img in p.imgIds]
        return _C.COCOevalEvaluateAccumulate(p, ious, ev.gt_dataset, ev.dt_dataset, p.imgIds, p.catIds,
                                             False)["matched"]
    # Only the detections that can match (IoU >= 0.5 with some box of their cell) go in: the
    # others match nothing and take nothing from the greedy matching of the rest, and most
    # detections are of that kind. Kept rows stay in score order, as the C++ sorts them (stably).
    dts = _C.Dataset()
    ious = []  # (I, K) IoU matrices of the kept detections
    for img in p.imgIds:
        row = []
        for cat in p.catIds:
            m = ev.ious[img, cat]
            if len(m) == 0:
                row.append([])
                continue
            m = np.asarray(m)  # (D, G) detections in score order (maxDets cut), boxes
            keep = np.flatnonzero(m.max(axis=1) >= 0.5 - 1e-9)
            if keep.size == 0:
                row.append([])
                continue
            cell = ev.dt_dataset.get_instances([img], [cat], True)[0][0]
            order = np.argsort([-d["score"] for d in cell], kind="mergesort")[:max_dets]  # as computeIoU
            for i in order[keep]:
                dts.append_ref(img, cat, cell[i])
            row.append(m[keep])
        ious.append(row)
    return _C.COCOevalEvaluateAccumulate(p, ious, ev.gt_dataset, dts, p.imgIds, p.catIds, True)["matched"]


def matches_of_faster_eval(ev: Any, max_dets: int) -> list[ClassMatches]:
    """:func:`matches_from_matched` of an evaluated and accumulated ``COCOeval_faster``."""
    p = ev.params
    return matches_from_matched(matched_at_iou50(ev, max_dets), ev.cocoGt.anns, ev.cocoDt.anns,
                                p.imgIds, p.catIds, max_dets)
