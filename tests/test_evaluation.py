"""Tests of focaldet.evaluation: conversion, gathering, COCO metrics and PR plots."""

import json
import math

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from focaldet.evaluation import (
    STAT_NAMES,
    detections_to_coco,
    evaluate_coco,
    evaluate_distributed,
    gather_results,
    merge_rank_results,
    plot_pr_curves,
    write_results_json,
)
from focaldet.errors import ConfigError

CAT_IDS = [1, 3, 7]  # non-contiguous on purpose: label k -> CAT_IDS[k]

# Ground truth: image 10 has a large "a" and a medium "b"; image 20 a large "a" and a
# large "c". xywh boxes.
GT_BOXES = {
    10: [(1, [10, 10, 100, 120]), (3, [150, 40, 50, 40])],
    20: [(1, [5, 5, 200, 150]), (7, [220, 100, 120, 110])],
}


@pytest.fixture
def gt_path(tmp_path):
    images = [{"id": i, "width": 400, "height": 300, "file_name": f"{i}.jpg"} for i in GT_BOXES]
    anns = []
    for image_id, boxes in GT_BOXES.items():
        for cat, (x, y, w, h) in boxes:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat,
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})  # fmt: skip
    cats = [{"id": c, "name": n} for c, n in zip(CAT_IDS, ["a", "b", "c"])]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


@pytest.fixture
def coco_gt(gt_path, capsys):
    coco = COCO(str(gt_path))
    capsys.readouterr()
    return coco


def perfect_results(cats=CAT_IDS):
    """One result entry per gt box of a category in ``cats``, score 0.9."""
    return [
        {"image_id": i, "category_id": c, "bbox": [float(v) for v in box], "score": 0.9}
        for i, boxes in GT_BOXES.items()
        for c, box in boxes
        if c in cats
    ]


def cocoeval_stats(coco, results):
    """The 12 numbers from pycocotools used directly."""
    ev = COCOeval(coco, coco.loadRes([dict(r) for r in results]), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev.stats


# --------------------------------------------------------------------------- conversion


def test_detections_to_coco_converts_boxes_and_maps_labels():
    dets = [
        {"boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0], [0.5, 1.25, 2.5, 3.0]]),
         "scores": torch.tensor([0.9, 0.25]), "labels": torch.tensor([2, 0])},  # fmt: skip
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)},
        {"boxes": torch.tensor([[1.0, 2.0, 3.0, 5.0]]), "scores": torch.tensor([0.5]), "labels": torch.tensor([1])},
    ]
    out = detections_to_coco(torch.tensor([5, 6, 9]), dets, CAT_IDS)
    assert out == [
        {"image_id": 5, "category_id": 7, "bbox": [10.0, 20.0, 30.0, 40.0], "score": 0.9},
        {"image_id": 5, "category_id": 1, "bbox": [0.5, 1.25, 2.0, 1.75], "score": 0.25},
        {"image_id": 9, "category_id": 3, "bbox": [1.0, 2.0, 2.0, 3.0], "score": 0.5},
    ]
    entry = out[0]
    assert type(entry["image_id"]) is int and type(entry["category_id"]) is int
    assert type(entry["score"]) is float and all(type(v) is float for v in entry["bbox"])
    json.dumps(out)  # serialisable as is


def test_detections_to_coco_rejects_bad_input():
    det = {"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.tensor([3])}
    with pytest.raises(ValueError, match="labels"):
        detections_to_coco([1], [det], CAT_IDS)
    with pytest.raises(ValueError, match="image ids"):
        detections_to_coco([1, 2], [det], CAT_IDS)
    assert detections_to_coco([], [], CAT_IDS) == []


# --------------------------------------------------------------------------- gathering


def _entries(image_id, n, tag):
    return [{"image_id": image_id, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5, "tag": tag}] * n


def test_merge_rank_results_drops_padded_repeats():
    rank0 = _entries(1, 2, "r0") + _entries(3, 1, "r0")
    rank1 = _entries(2, 1, "r1") + _entries(1, 3, "r1")  # image 1 repeated by sampler padding
    merged = merge_rank_results([rank0, rank1])
    assert [(e["image_id"], e["tag"]) for e in merged] == [(1, "r0"), (1, "r0"), (3, "r0"), (2, "r1")]


def test_merge_rank_results_drops_repeat_on_same_rank():
    rank0 = _entries(1, 2, "first") + _entries(2, 1, "x") + _entries(1, 2, "again")
    merged = merge_rank_results([rank0, []])
    assert [e["tag"] for e in merged] == ["first", "first", "x"]


def test_gather_results_without_distributed_returns_local_results():
    local = _entries(1, 2, "a") + _entries(2, 1, "b")
    assert gather_results(local) == local


# --------------------------------------------------------------------------- evaluation


def test_perfect_detections_give_map_one(coco_gt, capsys):
    result = evaluate_coco(coco_gt, perfect_results())
    assert capsys.readouterr().out == ""  # library prints are silenced
    assert list(result.stats) == list(STAT_NAMES)
    for key in ("mAP", "AP50", "AP75", "APm", "APl", "AR10", "AR100", "ARm", "ARl"):
        assert result.stats[key] == pytest.approx(1.0), key
    assert result.stats["APs"] == -1.0  # no small objects: COCOeval's "not computable"
    assert result.per_class == pytest.approx({"a": 1.0, "b": 1.0, "c": 1.0})
    assert result.num_gt == {"a": 2, "b": 1, "c": 1}
    assert result.precision.shape == (10, 101, 3, 4, 3)


def test_gt_given_as_path_and_results_not_mutated(gt_path):
    results = perfect_results()
    before = json.dumps(results)
    assert evaluate_coco(str(gt_path), results).stats["mAP"] == pytest.approx(1.0)
    assert json.dumps(results) == before


def test_shifted_box_gives_expected_lower_ap(coco_gt):
    results = perfect_results()
    # Shift the "b" box (50x40) right by 10 px: IoU = 40*40 / (2*2000 - 1600) = 2/3.
    shifted = next(r for r in results if r["category_id"] == 3)
    shifted["bbox"][0] += 10
    result = evaluate_coco(coco_gt, results)
    # Class "b" is matched at IoU thresholds 0.50..0.65 (4 of 10): AP 0.4; "a", "c": 1.0.
    assert result.per_class["b"] == pytest.approx(0.4)
    assert result.stats["mAP"] == pytest.approx((1.0 + 0.4 + 1.0) / 3)
    assert result.stats["AP50"] == pytest.approx(1.0)
    assert result.stats["AP75"] == pytest.approx(2 / 3)
    np.testing.assert_allclose(list(result.stats.values()), cocoeval_stats(coco_gt, results))


def test_matches_pycocotools_on_noisy_detections(coco_gt):
    g = torch.Generator().manual_seed(0)
    results = []
    for image_id in GT_BOXES:
        xy = torch.rand(30, 2, generator=g) * 250
        wh = torch.rand(30, 2, generator=g) * 150 + 5
        boxes = torch.cat([xy, xy + wh], 1)
        det = {"boxes": boxes, "scores": torch.rand(30, generator=g), "labels": torch.randint(0, 3, (30,), generator=g)}
        results += detections_to_coco([image_id], [det], CAT_IDS)
    results += perfect_results(cats=[1])
    ours = evaluate_coco(coco_gt, results)
    np.testing.assert_allclose(list(ours.stats.values()), cocoeval_stats(coco_gt, results))


def test_faster_coco_eval_backend_matches(coco_gt):
    pytest.importorskip("faster_coco_eval")
    results = perfect_results()
    results[1]["bbox"][0] += 10
    results.append({"image_id": 20, "category_id": 3, "bbox": [0.0, 0.0, 30.0, 30.0], "score": 0.95})
    ref = evaluate_coco(coco_gt, results, backend="pycocotools")
    fast = evaluate_coco(coco_gt, results, backend="faster_coco_eval")
    np.testing.assert_allclose(list(fast.stats.values()), list(ref.stats.values()), atol=1e-4)
    np.testing.assert_allclose(fast.precision, ref.precision, atol=1e-6)
    assert fast.per_class == pytest.approx(ref.per_class)


def test_empty_results_give_zero_metrics(coco_gt):
    for backend in ("pycocotools", "faster_coco_eval"):
        if backend == "faster_coco_eval":
            pytest.importorskip("faster_coco_eval")
        result = evaluate_coco(coco_gt, [], backend=backend)
        stats = dict(result.stats)
        assert stats.pop("APs") == stats.pop("ARs") == -1.0  # no small gt boxes at all
        assert all(v == 0.0 for v in stats.values()), stats
        assert result.per_class == {"a": 0.0, "b": 0.0, "c": 0.0}


def test_per_class_ap_matches_detectron2_derivation(coco_gt):
    # Only class "a" detected: "a" perfect, "b" and "c" missed.
    result = evaluate_coco(coco_gt, perfect_results(cats=[1]), class_names=["cat", "dog", "cow"])
    assert result.per_class == pytest.approx({"cat": 1.0, "dog": 0.0, "cow": 0.0})
    assert result.per_class_ap50 == pytest.approx({"cat": 1.0, "dog": 0.0, "cow": 0.0})
    # detectron2's _derive_coco_results, verbatim on the precision array.
    for k, name in enumerate(result.class_names):
        p = result.precision[:, :, k, 0, -1]
        p = p[p > -1]
        assert result.per_class[name] == pytest.approx(np.mean(p) if p.size else float("nan"))
    assert result.stats["mAP"] == pytest.approx(1 / 3)
    table = result.per_class_table()
    assert "cat" in table and "1.0000" in table and "0.0000" in table
    assert "mAP" in result.table() and len(result.table().splitlines()) == 14


def test_image_ids_restricts_evaluation(coco_gt):
    # Only image 10 has detections; evaluating over it alone is perfect.
    results = [r for r in perfect_results() if r["image_id"] == 10]
    assert evaluate_coco(coco_gt, results).stats["mAP"] < 1.0
    subset = evaluate_coco(coco_gt, results, image_ids=[10])
    assert subset.stats["mAP"] == pytest.approx(1.0)
    assert subset.num_gt == {"a": 1, "b": 1, "c": 0}
    assert math.isnan(subset.per_class["c"])  # no gt of "c" in image 10
    assert "-" in subset.per_class_table().splitlines()[-1]


def test_evaluate_distributed_without_distributed_equals_evaluate(coco_gt):
    results = perfect_results(cats=[1, 3])
    assert evaluate_distributed(coco_gt, results).stats == evaluate_coco(coco_gt, results).stats


def test_unknown_backend_raises(coco_gt):
    with pytest.raises(ConfigError, match="backend"):
        evaluate_coco(coco_gt, [], backend="nope")


# --------------------------------------------------------------------------- outputs


def test_write_results_json_is_atomic_and_readable(tmp_path):
    results = perfect_results()
    path = write_results_json(results, tmp_path / "sub" / "results.json")
    assert json.loads(path.read_text()) == results
    write_results_json([], path)  # overwrite in place
    assert json.loads(path.read_text()) == []
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]  # no temp file left


def test_plot_pr_curves_writes_png(coco_gt, tmp_path):
    from PIL import Image

    result = evaluate_coco(coco_gt, perfect_results(cats=[1, 3]))
    path = plot_pr_curves(result, tmp_path / "pr.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100


# --------------------------------------------------------------------------- distributed


def _ddp_worker(rank, world_size, init_file, gt_path, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        entries = {r["image_id"]: [] for r in perfect_results()}
        for r in perfect_results():
            entries[r["image_id"]].append(r)
        # Sampler padding: rank 0 sees image 10, rank 1 sees image 20 and 10 again.
        local = entries[10] if rank == 0 else entries[20] + entries[10]
        result = evaluate_distributed(str(gt_path), local)
        (out_dir / f"{rank}.json").write_text(json.dumps(result.stats))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_evaluate_distributed_two_processes_equals_one(gt_path, tmp_path):
    from warm import spawn

    spawn(_ddp_worker, (2, tmp_path / "init", gt_path, tmp_path), nprocs=2)
    single = evaluate_coco(str(gt_path), perfect_results()).stats
    for rank in range(2):
        assert json.loads((tmp_path / f"{rank}.json").read_text()) == pytest.approx(single)
