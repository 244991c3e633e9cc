"""Tests of the evaluation extras on hand-made examples: F1 thresholds (against a brute-force
count), confusion matrix (known counts), TIDE breakdown (against tidecv's own loaders),
maxDets, the Evaluator's steps and the default logger."""

import json
import math

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from focaldet.errors import ConfigError
from focaldet.evaluation import Evaluator, confusion_matrix, evaluate_coco, f1_thresholds, load_thresholds
from focaldet.evaluation.confusion import plot_confusion, write_confusion_csv
from focaldet.evaluation.thresholds import best_f1, ClassMatches, per_label_thresholds

CATS = [{"id": 1, "name": "A"}, {"id": 5, "name": "B"}]


def coco_from(tmp_path, images, anns, name="gt.json"):
    """A pycocotools COCO of hand-made annotations (``(image_id, cat, [x, y, w, h], iscrowd)``)."""
    entries = [{"id": i, "width": 400, "height": 400, "file_name": f"{i}.jpg"} for i in images]
    annotations = [{"id": n + 1, "image_id": i, "category_id": c, "bbox": list(map(float, b)), "area": b[2] * b[3],
                    "iscrowd": crowd, "segmentation": [[b[0], b[1], b[0] + b[2], b[1], b[0] + b[2], b[1] + b[3]]]}
                   for n, (i, c, b, crowd) in enumerate(anns)]
    path = tmp_path / name
    path.write_text(json.dumps({"images": entries, "annotations": annotations, "categories": CATS}))
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path)), path


def det(image_id, cat, box, score):
    return {"image_id": image_id, "category_id": cat, "bbox": list(map(float, box)), "score": score}


# --------------------------------------------------------------------------- thresholds


def test_best_f1_by_hand():
    # class with 3 gt; detections by score: TP, FP, TP, FP, TP
    m = ClassMatches(np.array([0.9, 0.8, 0.7, 0.6, 0.5]), np.array([1, 0, 1, 0, 1], bool), 3)
    # F1 at 0.9: 0.5; 0.8: 0.4; 0.7: 2/3; 0.6: 4/7; 0.5: P 3/5, R 1 -> 0.75
    assert best_f1(m) == pytest.approx({"score": 0.5, "precision": 0.6, "recall": 1.0, "f1": 0.75})
    # a tie group is kept or dropped as a whole: at 0.7 both detections are kept
    tie = ClassMatches(np.array([0.9, 0.7, 0.7]), np.array([1, 0, 1], bool), 2)
    assert best_f1(tie) == pytest.approx({"score": 0.7, "precision": 2 / 3, "recall": 1.0, "f1": 0.8})
    # ties in F1 go to the higher score: 0.9 (P 1, R 1/2) and 0.3 (P 1/2, R 1) both give 2/3
    even = ClassMatches(np.array([0.9, 0.5, 0.4, 0.3]), np.array([1, 0, 0, 1], bool), 2)
    assert best_f1(even)["score"] == 0.9 and best_f1(even)["f1"] == pytest.approx(2 / 3)
    assert math.isnan(best_f1(ClassMatches(np.zeros(0), np.zeros(0, bool), 2))["score"])


def _iou(a, b):
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw, ih = max(0, min(ax2, bx2) - max(a[0], b[0])), max(0, min(ay2, by2) - max(a[1], b[1]))
    inter = iw * ih
    return inter, inter / (a[2] * a[3] + b[2] * b[3] - inter)


def brute_force(anns, results, cat, threshold):
    """TP, FP, #gt of ``cat`` for detections scoring >= threshold: greedy by score, best IoU
    >= 0.5 with a free box; a leftover on a crowd region (inter / det area >= 0.5) is ignored."""
    tp = fp = 0
    n_gt = sum(1 for _, c, _, crowd in anns if c == cat and not crowd)
    for image in {a[0] for a in anns} | {r["image_id"] for r in results}:
        gts = [a for a in anns if a[0] == image and a[1] == cat]
        free = [not a[3] for a in gts]
        dets = sorted([r for r in results if r["image_id"] == image and r["category_id"] == cat
                       and r["score"] >= threshold], key=lambda r: -r["score"])
        for r in dets:
            best, best_iou = -1, 0.5 - 1e-12
            for g, a in enumerate(gts):
                if free[g] and not a[3] and _iou(r["bbox"], a[2])[1] > best_iou:
                    best, best_iou = g, _iou(r["bbox"], a[2])[1]
            if best >= 0:
                free[best] = False
                tp += 1
            elif any(a[3] and _iou(r["bbox"], a[2])[0] / (r["bbox"][2] * r["bbox"][3]) >= 0.5 for a in gts):
                continue
            else:
                fp += 1
    return tp, fp, n_gt


@pytest.fixture
def scene(tmp_path):
    """Two images, two classes, a crowd region, duplicates, a wrong class and misses; random scores."""
    rng = np.random.default_rng(0)
    anns, results = [], []
    for image in (1, 2):
        for k in range(6):
            x, y = 20 + 60 * k, 30 + 40 * image
            anns.append((image, 1 if k % 2 else 5, [x, y, 40, 40], 0))
        anns.append((image, 1, [0, 300, 200, 100], 1))  # crowd region of class A
    for image, cat, box, crowd in anns:
        if crowd:
            results.append(det(image, cat, [10, 310, 50, 50], float(rng.uniform())))  # on the crowd: ignored
            continue
        for _ in range(int(rng.integers(0, 3))):  # 0-2 detections: misses and duplicates
            jitter = rng.normal(0, 6, 2)
            results.append(det(image, cat, [box[0] + jitter[0], box[1] + jitter[1], 40, 40], float(rng.uniform())))
        if rng.uniform() < 0.3:  # wrong class at the right place
            results.append(det(image, 6 - cat if cat == 5 else 5, box, float(rng.uniform())))
    results += [det(1, 1, [300, 350, 30, 30], 0.95), det(2, 5, [350, 350, 20, 20], 0.85)]  # background
    gt, path = coco_from(tmp_path, [1, 2], anns)
    return gt, path, anns, results


def test_f1_thresholds_equal_brute_force(scene):
    gt, _, anns, results = scene
    thresholds = f1_thresholds(evaluate_coco(gt, results).matches, ["A", "B"])
    for name, cat in (("A", 1), ("B", 5)):
        best = (-1.0, None)
        for s in sorted({r["score"] for r in results if r["category_id"] == cat}, reverse=True):
            tp, fp, n = brute_force(anns, results, cat, s)
            if tp + fp == 0:  # only ignored detections (on the crowd region) kept
                continue
            f1 = 2 * tp / (tp + fp + n) if tp else 0.0
            if f1 > best[0] + 1e-12:
                best = (f1, {"score": s, "precision": tp / (tp + fp), "recall": tp / n, "f1": f1})
        assert thresholds[name] == pytest.approx(best[1]), name
    # all classes together: pooled counts at one threshold
    s = thresholds["all"]["score"]
    (tpa, fpa, na), (tpb, fpb, nb) = (brute_force(anns, results, c, s) for c in (1, 5))
    assert thresholds["all"]["precision"] == pytest.approx((tpa + tpb) / (tpa + tpb + fpa + fpb))
    assert thresholds["all"]["recall"] == pytest.approx((tpa + tpb) / (na + nb))


def test_faster_coco_eval_gives_the_same_thresholds(scene):
    pytest.importorskip("faster_coco_eval")
    gt, _, _, results = scene
    ref = f1_thresholds(evaluate_coco(gt, results).matches, ["A", "B"])
    assert f1_thresholds(evaluate_coco(gt, results, backend="faster_coco_eval").matches, ["A", "B"]) == ref


def test_load_thresholds(tmp_path):
    assert load_thresholds(0.25) == 0.25 and load_thresholds("0.4") == 0.4
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps({"A": {"score": 0.3, "f1": 0.9}, "B": {"score": None}, "all": {"score": 0.5}}))
    loaded = load_thresholds(str(path))
    assert loaded == {"A": 0.3, "all": 0.5}
    assert per_label_thresholds(loaded, ["A", "B"]).tolist() == [0.3, 0.5]  # B falls back to "all"
    with pytest.raises(ConfigError, match="not found"):
        load_thresholds(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json"):
        load_thresholds(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="list.json"):
        load_thresholds(tmp_path / "list.json")


# --------------------------------------------------------------------------- confusion matrix


def test_confusion_matrix_known_counts(tmp_path):
    anns = [(1, 1, [10, 10, 50, 50], 0),   # A: found as A
            (1, 5, [100, 10, 50, 50], 0),  # B: found as A (confusion B -> A)
            (1, 1, [200, 10, 50, 50], 0),  # A: missed (its detection scores below A's threshold)
            (1, 5, [10, 200, 50, 50], 0),  # B: found as B, plus a duplicate (a false detection)
            (1, 1, [200, 200, 150, 150], 1)]  # crowd region
    results = [det(1, 1, [12, 10, 50, 50], 0.9), det(1, 1, [100, 12, 50, 50], 0.8),
               det(1, 1, [200, 10, 50, 50], 0.2),   # below threshold 0.5: dropped
               det(1, 5, [10, 200, 50, 50], 0.7), det(1, 5, [12, 202, 50, 50], 0.6),  # duplicate
               det(1, 1, [250, 250, 40, 40], 0.9),  # on the crowd region: ignored
               det(1, 5, [300, 10, 30, 30], 0.9)]   # on nothing: background row
    gt, _ = coco_from(tmp_path, [1], anns)
    cm = confusion_matrix(gt.dataset, results, [1, 5], ["A", "B"], [0.5, 0.5])
    # rows truth (A, B, background), columns prediction (A, B, background)
    assert cm.matrix.tolist() == [[1, 0, 1],
                                  [1, 1, 0],
                                  [0, 2, 0]]
    assert cm.labels == ["A", "B", "background"]
    csv_path = write_confusion_csv(cm, tmp_path / "cm.csv")
    assert csv_path.read_text().splitlines()[0] == "true \\ predicted,A,B,background"
    assert plot_confusion(cm, tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"


def test_confusion_diagonal_matches_thresholds_counts(scene):
    gt, _, anns, results = scene
    report = Evaluator(["A", "B"]).compute(gt, results)
    m, th = report.confusion.matrix, report.thresholds
    for k, (name, cat) in enumerate((("A", 1), ("B", 5))):
        tp, fp, n = brute_force(anns, results, cat, th[name]["score"])
        assert m[k, k] == tp  # same-class matching is COCOeval's
        assert m[k].sum() == n  # every non-crowd box is counted once in its row


# --------------------------------------------------------------------------- TIDE


def test_tide_errors_equal_tidecv_on_its_own_loaders(scene, tmp_path):
    pytest.importorskip("tidecv")
    from tidecv import TIDE, datasets

    from focaldet.evaluation.errors import tide_errors

    gt, path, _, results = scene
    res_path = tmp_path / "results.json"
    res_path.write_text(json.dumps(results))
    tide = TIDE()
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        run = tide.evaluate(datasets.COCO(str(path)), datasets.COCOResult(str(res_path)), mode=TIDE.BOX)
        ref = {e.short_name: v / 100 for e, v in run.fix_main_errors().items()}
    ours = tide_errors(gt.dataset, results)
    assert ours["ap50"] == pytest.approx(run.ap / 100)
    for short, name in (("Cls", "classification"), ("Loc", "localisation"), ("Both", "both"),
                        ("Dupe", "duplicate"), ("Bkg", "background"), ("Miss", "missed")):
        assert ours["dAP"][name] == pytest.approx(ref[short]), name
    assert ours["dAP"]["classification"] > 0 and ours["count"]["background"] >= 2


def test_tide_errors_without_detections_is_none(scene):
    pytest.importorskip("tidecv")
    from focaldet.evaluation.errors import tide_errors

    assert tide_errors(scene[0].dataset, []) is None


# --------------------------------------------------------------------------- maxDets


def test_max_dets_reaches_cocoeval(tmp_path):
    anns = [(1, 1, [(i % 15) * 26, (i // 15) * 26, 20, 20], 0) for i in range(150)]
    results = [det(1, 1, [(i % 15) * 26, (i // 15) * 26, 20, 20], 1.0 - i / 1000) for i in range(150)]
    gt, _ = coco_from(tmp_path, [1], anns)
    at100, at200 = evaluate_coco(gt, results), evaluate_coco(gt, results, max_dets=200)
    assert at100.stats["AR100"] == pytest.approx(100 / 150) and at200.stats["AR100"] == pytest.approx(1.0)
    ev = COCOeval(gt, gt.loadRes([dict(r) for r in results]), "bbox")
    ev.params.maxDets = [1, 10, 200]
    ev.evaluate(), ev.accumulate()
    p = ev.eval["precision"][:, :, :, 0, -1]
    assert at200.stats["mAP"] == pytest.approx(p[p > -1].mean()) and at200.stats["mAP"] > at100.stats["mAP"]
    assert sum(m.tp.sum() for m in at200.matches) == 150 and at200.max_dets == 200
    with pytest.raises(ConfigError, match="max_dets"):
        evaluate_coco(gt, results, max_dets=5)


# --------------------------------------------------------------------------- Evaluator steps


def test_evaluator_steps(scene, tmp_path):
    gt, _, _, results = scene
    ev = Evaluator(["A", "B"])
    report = ev.compute(gt, results, stage="val", results_path=tmp_path / "val_detections.json")
    metrics = ev.metrics(report)
    assert metrics["val/mAP"] == report.coco.stats["mAP"] and "val/AP/A" in metrics and "val/AP50/B" in metrics
    text = ev.summary(report)
    assert "Score thresholds maximising F1" in text and "all" in text
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    preview = ([image], [{"boxes": torch.tensor([[1.0, 1, 30, 30]]), "scores": torch.tensor([0.9]),
                          "labels": torch.tensor([0])}], [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}])
    names = {p.name for p in ev.write(report, tmp_path, preview)}
    expected = {"val_pr_curves.png", "val_detections.png", "thresholds.json", "confusion_matrix.csv",
                "confusion_matrix.png", "confusion_matrix_normalized.png", "report.html"}
    if report.errors is not None:
        expected |= {"errors.json", "errors.png"}
    assert names == expected
    written = json.loads((tmp_path / "thresholds.json").read_text())
    assert set(written) == {"A", "B", "all"} and set(written["A"]) == {"score", "precision", "recall", "f1"}
    # without extras (each validation during fit): COCO numbers only
    light = ev.compute(gt, results, extras=False)
    assert light.thresholds is None and light.confusion is None and light.errors is None

    class Writer:  # a TensorBoard-like experiment
        def __init__(self):
            self.tags = []

        def add_image(self, tag, image, global_step, dataformats):
            assert image.dtype == np.uint8 and image.ndim == 3 and dataformats == "HWC"
            self.tags.append(tag)

    class FakeLogger:
        experiment = Writer()

    logger = FakeLogger()
    assert ev.log_images(report, [logger], step=3, preview=preview) == 2
    assert logger.experiment.tags == ["val/pr_curves", "val/detections"]
