"""``focaldet validate`` writes the evaluation files, logs val/loss; predict applies
thresholds.json; the default logger writes TensorBoard events and metrics.csv together."""

import contextlib
import csv
import io
import json
import math
from pathlib import Path

import pytest

from focaldet.cli import main
from helpers import ckpt_dir, tiny_config


def _latest_version(run):
    return max((run / "lightning_logs").iterdir(), key=lambda p: int(p.name.split("_")[1]))


def validate_then_predict(out: Path, synth, done: dict) -> dict:
    """fit of the tiny config (every candidate kept); validate with a bad evaluation setting,
    then as given; predict at validate's thresholds.json, then at 0.5: a background job
    (tests/background.py). What validate printed and each run's folder."""
    low = {"class_path": "focaldet.models.PostProcess", "init_args": {"score_thresh": 0.0, "detections_per_img": 20}}
    cfg = tiny_config(out, synth, **{"model.model.postprocess": low})
    run = out / "run"
    assert main(["fit", "-c", str(cfg)]) == 0
    fit_dir = _latest_version(run)
    bad, good = io.StringIO(), io.StringIO()
    # an evaluation setting given to validate wins over the checkpoint's (fit's 100 replaced it)
    with contextlib.redirect_stderr(bad):
        bad_status = main(["validate", "-c", str(cfg), "--ckpt_path", "last", "--model.evaluation.max_dets", "5"])
    with contextlib.redirect_stdout(good):
        assert main(["validate", "-c", str(cfg), "--ckpt_path", "last"]) == 0
    version = _latest_version(run)
    assert main(["predict", "-c", str(cfg), "--ckpt_path", "last", "--data.predict_images", str(synth.images),
                 "--model.prediction.score_threshold", str(version / "thresholds.json")]) == 0
    at_thresholds = _latest_version(run)
    assert main(["predict", "-c", str(cfg), "--ckpt_path", "last", "--data.predict_images", str(synth.images),
                 "--model.prediction.score_threshold", "0.5"]) == 0
    return {"run": str(run), "fit": str(fit_dir), "bad_status": bad_status, "bad_err": bad.getvalue(),
            "validate_out": good.getvalue(), "validate": str(version), "predict_thresholds": str(at_thresholds),
            "predict_05": str(_latest_version(run))}


@pytest.mark.slow
def test_validate_writes_evaluation_files_and_predict_uses_thresholds(evaluator_run, synth_coco):
    r = evaluator_run
    run, fit_dir = Path(r["run"]), Path(r["fit"])
    with open(fit_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    val_rows = [r for r in rows if r.get("val/loss")]
    assert val_rows and all(math.isfinite(float(r["val/loss"])) for r in val_rows)
    assert {"val/loss_cls", "val/loss_box", "val/AP/circle"} <= set(rows[0])

    # an evaluation setting given to validate wins over the checkpoint's (fit's 100 replaced it)
    assert r["bad_status"] == 1 and "max_dets must be >= 10" in r["bad_err"]
    out = r["validate_out"]
    assert "Score thresholds maximising F1 at IoU 0.5" in out and "TIDE error breakdown" in out
    version = Path(r["validate"])
    for name in ("thresholds.json", "confusion_matrix.csv", "confusion_matrix.png", "errors.json", "errors.png",
                 "val_pr_curves.png", "val_detections.png", "val_detections.json", "confusion_matrix_normalized.png",
                 "report.html", "training_curves.png"):  # the curves: from fit's metrics.csv, named by the checkpoint
        assert (version / name).is_file(), name
    page = (version / "report.html").read_text()
    assert 'src="training_curves.png"' in page and f'href="../{fit_dir.name}/metrics.csv"' in page
    thresholds = json.loads((version / "thresholds.json").read_text())
    assert set(thresholds) == {"circle", "square", "triangle", "cross", "all"}
    errors = json.loads((version / "errors.json").read_text())
    assert set(errors["dAP"]) == {"classification", "localisation", "both", "duplicate", "background", "missed"}
    with open(version / "confusion_matrix.csv") as f:
        table = list(csv.reader(f))
    assert table[0] == ["true \\ predicted", "circle", "square", "triangle", "cross", "background"]
    gt = json.loads(synth_coco.val_ann.read_text())
    assert sum(int(v) for row in table[1:5] for v in row[1:]) == len(gt["annotations"])  # each box once
    with open(version / "metrics.csv") as f:
        assert "val/loss" in next(csv.reader(f))

    preds = json.loads((Path(r["predict_thresholds"]) / "predictions.json").read_text())
    floor = {n: (t["score"] if t["score"] is not None else thresholds["all"]["score"]) for n, t in thresholds.items()}
    assert all(p["score"] >= floor[p["category_name"]] - 1e-5 for p in preds)
    import focaldet

    detector = focaldet.load(ckpt_dir(run) / "last.ckpt")  # Detector.predict reads the same file
    for d in detector.predict(str(synth_coco.images), score_threshold=str(version / "thresholds.json")):
        assert all(s >= floor[detector.names[k]] - 1e-5 for s, k in zip(d["scores"].tolist(), d["labels"].tolist()))
    assert all(p["score"] >= 0.5 for p in json.loads((Path(r["predict_05"]) / "predictions.json").read_text()))


@pytest.mark.slow
def test_default_logger_writes_tensorboard_and_csv_in_one_folder(tmp_path, synth_coco):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(tmp_path, synth_coco)
    main(["fit", "-c", str(cfg)])
    versions = list((tmp_path / "run" / "lightning_logs").iterdir())
    assert len(versions) == 1
    folder = versions[0]
    assert (folder / "metrics.csv").is_file() and list(folder.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    scalars, images = set(acc.Tags()["scalars"]), set(acc.Tags()["images"])
    assert {"train/loss", "val/loss", "val/mAP", "val/AP50", "val/AP/circle", "lr-SGD"} <= scalars
    assert {"val/detections", "val/pr_curves"} <= images
