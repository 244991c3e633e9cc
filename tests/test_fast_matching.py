"""faster-coco-eval's IoU-0.5 matching (focaldet/evaluation/fast_matching.py) against
pycocotools' ``evalImgs`` matching, detection by detection, on random and adversarial
cases: score ties, duplicate boxes, crowd regions, the maxDets cut, image subsets."""

import contextlib
import io

import numpy as np
import pytest
from faster_coco_eval import COCO as FCOCO
from faster_coco_eval import COCOeval_faster
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from focaldet.bench.coco_eval import synthetic_coco_eval_data
from focaldet.evaluation import evaluate_coco, f1_thresholds
from focaldet.evaluation.fast_matching import matches_of_faster_eval
from focaldet.evaluation.thresholds import matches_at_iou50


def _coco(cls, dataset):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = cls()
        gt.dataset = dataset
        gt.createIndex()
    return gt


def _both(dataset, results, max_dets=100, img_ids=None):
    """(pycocotools matches, faster-coco-eval matches) of one evaluation."""
    out = []
    for coco_cls, eval_cls, kw in ((COCO, COCOeval, {}), (FCOCO, COCOeval_faster, {"print_function": print})):
        with contextlib.redirect_stdout(io.StringIO()):
            gt = _coco(coco_cls, dataset)
            ev = eval_cls(gt, gt.loadRes([dict(r) for r in results]), iouType="bbox", **kw)
            if img_ids is not None:
                ev.params.imgIds = sorted(img_ids)
            ev.params.maxDets = [1, 10, max_dets]
            ev.evaluate()
            ev.accumulate()
        out.append(matches_at_iou50(ev, max_dets) if eval_cls is COCOeval else matches_of_faster_eval(ev, max_dets))
    return out


def _assert_same(ref, fast):
    assert len(ref) == len(fast)
    for k, (a, b) in enumerate(zip(ref, fast)):
        assert a.num_gt == b.num_gt, f"class {k}"
        np.testing.assert_array_equal(a.scores, b.scores, err_msg=f"class {k}")
        np.testing.assert_array_equal(a.tp, b.tp, err_msg=f"class {k}")


def _adversarial(seed, num_images=40, num_classes=4, max_dets_per_image=60):
    """Few classes and many detections per image: score ties (2 decimals), exact duplicates
    of gt boxes, crowd regions that swallow detections, more detections than maxDets."""
    rng = np.random.default_rng(seed)
    images, anns, results = [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": 200, "height": 200})
        boxes = []
        for _ in range(int(rng.integers(0, 8))):
            w, h = rng.uniform(5, 80, 2)
            box = [float(rng.uniform(0, 200 - w)), float(rng.uniform(0, 200 - h)), float(w), float(h)]
            crowd = int(rng.random() < 0.2)
            cat = int(rng.integers(1, num_classes + 1)) * 3  # ids with gaps
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "bbox": box,
                         "area": box[2] * box[3], "iscrowd": crowd})
            boxes.append((box, cat))
        for _ in range(int(rng.integers(0, max_dets_per_image))):
            score = round(float(rng.uniform(0, 1)), 2)  # many ties
            if boxes and rng.random() < 0.7:
                box, cat = boxes[int(rng.integers(len(boxes)))]
                if rng.random() < 0.5:  # exact duplicate, or a jittered copy
                    box = [v + float(rng.normal(0, 3)) for v in box]
                    box[2], box[3] = max(box[2], 1.0), max(box[3], 1.0)
                if rng.random() < 0.2:
                    cat = int(rng.integers(1, num_classes + 1)) * 3
            else:
                w, h = rng.uniform(5, 80, 2)
                box = [float(rng.uniform(0, 200 - w)), float(rng.uniform(0, 200 - h)), float(w), float(h)]
                cat = int(rng.integers(1, num_classes + 1)) * 3
            results.append({"image_id": image_id, "category_id": cat, "bbox": [float(v) for v in box],
                            "score": score})
    cats = [{"id": c * 3, "name": f"c{c}"} for c in range(1, num_classes + 1)]
    return {"images": images, "annotations": anns, "categories": cats}, results


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_scenes_match_pycocotools(seed):
    dataset, results = synthetic_coco_eval_data(60, 40, seed, num_classes=10)
    for a in dataset["annotations"][:: 7 + seed]:
        a["iscrowd"] = 1
    _assert_same(*_both(dataset, results))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("max_dets", [10, 100])
def test_adversarial_scenes_match_pycocotools(seed, max_dets):
    dataset, results = _adversarial(seed)
    ref, fast = _both(dataset, results, max_dets=max_dets)
    assert sum(m.tp.sum() for m in ref) > 0 and any(a["iscrowd"] for a in dataset["annotations"])
    _assert_same(ref, fast)


def test_image_subset_and_ties_only():
    dataset, results = _adversarial(5)
    for r in results:
        r["score"] = 0.5  # every detection tied: input order decides the maxDets cut
    _assert_same(*_both(dataset, results, max_dets=10, img_ids=list(range(3, 30, 2))))


def test_evaluate_coco_thresholds_equal_across_backends():
    dataset, results = _adversarial(7)
    names = [c["name"] for c in dataset["categories"]]
    ref = evaluate_coco(_coco(COCO, dataset), results, backend="pycocotools")
    fast = evaluate_coco(_coco(FCOCO, dataset), results, backend="faster_coco_eval")
    assert fast.stats == pytest.approx(ref.stats, abs=1e-12)
    assert f1_thresholds(fast.matches, names) == f1_thresholds(ref.matches, names)
    empty = evaluate_coco(_coco(FCOCO, dataset), [], backend="faster_coco_eval")
    assert [m.tp.size for m in empty.matches] == [0] * len(names)
