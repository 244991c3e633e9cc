"""The pictures validate writes and report.html: rendered for mixed image sizes and 1, 3 and 80
classes, then checked for what can be checked (sizes, no black tiles, titles inside the canvas,
every link of the report resolving to a file)."""

import csv
import html.parser
import math
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from focaldet.evaluation import Evaluator
from focaldet.evaluation.coco import pr_curves_figure
from focaldet.evaluation.confusion import ConfusionMatrix, confusion_figure, row_normalised
from focaldet.evaluation.report import read_metrics_csv, training_curves_figure

SIZES = [(480, 640), (460, 240), (240, 320), (96, 96), (200, 800), (1000, 500), (380, 260), (64, 128)]  # (h, w)


def _scene(num_classes: int, seed: int = 0):
    """A COCO ground truth of mixed image sizes with ``num_classes`` classes, detections that
    find most boxes (some with the wrong class, some on nothing), and a preview batch."""
    rng = np.random.default_rng(seed)
    cats = [{"id": 10 + k, "name": f"class_{k}" if num_classes > 3 else ["cell", "RBC", "WBC"][k]}
            for k in range(num_classes)]
    images, anns, results = [], [], []
    for i, (h, w) in enumerate(SIZES, start=1):
        images.append({"id": i, "file_name": f"{i}.jpg", "height": h, "width": w})
        for _ in range(int(rng.integers(2, 9))):
            bw, bh = rng.uniform(0.1, 0.4) * w, rng.uniform(0.1, 0.4) * h
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            cat = 10 + int(rng.integers(num_classes))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat, "bbox": [x, y, bw, bh],
                         "area": bw * bh, "iscrowd": 0})
            if rng.uniform() < 0.85:
                wrong = rng.uniform() < 0.1 and num_classes > 1
                results.append({"image_id": i, "category_id": 10 + int(rng.integers(num_classes)) if wrong else cat,
                                "bbox": [x + rng.normal(0, 2), y + rng.normal(0, 2), bw, bh],
                                "score": float(rng.uniform(0.3, 1.0))})
        results.append({"image_id": i, "category_id": 10, "bbox": [1.0, 1.0, w / 5, h / 5],
                        "score": float(rng.uniform(0.1, 0.6))})  # on nothing (mostly)
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": cats}
    gt.createIndex()
    names = [c["name"] for c in cats]
    k_of = {c["id"]: k for k, c in enumerate(cats)}
    preview = ([], [], [])
    gen = torch.Generator().manual_seed(seed)
    for img in images:
        h, w = img["height"], img["width"]
        preview[0].append(torch.randint(40, 220, (3, h, w), dtype=torch.uint8, generator=gen))
        mine = [a for a in anns if a["image_id"] == img["id"]]
        dets = [r for r in results if r["image_id"] == img["id"]]

        def xyxy(items):
            b = torch.tensor([a["bbox"] for a in items], dtype=torch.float32).reshape(-1, 4)
            return torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], dim=1)  # (N, 4) xywh -> xyxy

        preview[1].append({"boxes": xyxy(dets), "scores": torch.tensor([r["score"] for r in dets]),
                           "labels": torch.tensor([k_of[r["category_id"]] for r in dets], dtype=torch.int64)})
        preview[2].append({"boxes": xyxy(mine),
                           "labels": torch.tensor([k_of[a["category_id"]] for a in mine], dtype=torch.int64)})
    return gt, results, names, preview


def _metrics_csv(path: Path, steps: int = 60) -> Path:
    """A Lightning-like metrics.csv: a row per step with the training losses and lr, and a
    validation row every 20 steps."""
    keys = ["step", "epoch", "train/loss", "train/loss_cls", "train/loss_box", "lr-SGD", "val/loss", "val/mAP",
            "val/AP50", "val/AP75"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        for s in range(steps):
            loss = 2.0 * math.exp(-s / 30) + 0.1 * math.sin(s)
            w.writerow({"step": s, "epoch": 0, "train/loss": loss, "train/loss_cls": 0.6 * loss,
                        "train/loss_box": 0.4 * loss, "lr-SGD": 0.01 * min(1, (s + 1) / 10)})
            if s % 20 == 19:
                w.writerow({"step": s, "epoch": 0, "val/loss": loss * 1.1, "val/mAP": s / 200, "val/AP50": s / 100,
                            "val/AP75": s / 300})
    return path


def _draw(fig):
    """Lay out and draw ``fig`` once on an Agg canvas; returns the renderer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def _inside(fig, artist, renderer=None) -> bool:
    """Whether ``artist``'s drawn extent lies within the figure's canvas."""
    box, frame = artist.get_window_extent(renderer or _draw(fig)), fig.bbox
    return (box.x0 >= frame.x0 - 0.5 and box.y0 >= frame.y0 - 0.5 and box.x1 <= frame.x1 + 0.5
            and box.y1 <= frame.y1 + 0.5 and box.width > 0)


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs, self.imgs = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "a" and attrs.get("href"):
            self.hrefs.append(attrs["href"])
        if tag == "img":
            self.imgs.append(attrs["src"])


@pytest.mark.parametrize("num_classes", [1, 3, pytest.param(80, marks=pytest.mark.slow)])
def test_validate_pictures_and_report_for_mixed_sizes(num_classes, tmp_path):
    gt, results, names, preview = _scene(num_classes)
    ev = Evaluator(names, error_breakdown=False)  # TIDE has its own tests; keeps this one fast
    report = ev.compute(gt, results, stage="val")
    run = tmp_path / "version_3"
    train_metrics = _metrics_csv(tmp_path / "metrics.csv")  # the training run's folder (another version)
    written = ev.write(report, run, preview, train_metrics=train_metrics)
    names_written = {p.name for p in written}
    assert {"val_detections.png", "val_pr_curves.png", "confusion_matrix.png", "confusion_matrix_normalized.png",
            "training_curves.png", "report.html"} <= names_written

    # the detection sheet: screen-sized, images packed (little background), no black tiles
    sheet = np.asarray(Image.open(run / "val_detections.png"))
    assert 800 <= sheet.shape[1] <= 1920 and 300 <= sheet.shape[0] <= 1920
    assert (sheet == 0).all(axis=2).mean() < 0.03
    # confusion matrices grow with the classes: cells stay >= ~25 px at 80 classes
    for name in ("confusion_matrix.png", "confusion_matrix_normalized.png"):
        w, h = Image.open(run / name).size
        assert 400 <= min(w, h) and max(w, h) <= 4000
        assert min(w, h) >= 25 * (num_classes + 1)

    # report.html: every link and picture resolves to a file in (or beside) the run folder
    page = (run / "report.html").read_text()
    links = _Links()
    links.feed(page)
    assert len(links.imgs) == 5  # detections, PR curves, 2 confusion matrices, training curves
    for ref in links.hrefs + links.imgs:
        assert not ref.startswith(("/", "http", "file:")), ref  # relative: opens with no server
        assert (run / unquote(ref)).is_file(), ref
    linked = {Path(unquote(r)).name for r in links.hrefs}
    assert names_written - {"report.html"} <= linked and "metrics.csv" in linked
    assert f"{report.coco.stats['mAP']:.4f}" in page  # the COCO table
    for name in names[:5]:
        assert f"<td>{name}</td>" in page  # per-class rows
    assert "F1 score threshold" in page


@pytest.mark.parametrize("num_classes", [1, 3, pytest.param(80, marks=pytest.mark.slow)])
def test_figure_titles_and_labels_stay_inside_the_canvas(num_classes):
    rng = np.random.default_rng(num_classes)
    names = [f"a_rather_long_class_name_{k}" for k in range(num_classes)]
    m = rng.poisson(0.5 if num_classes < 10 else 0.05, (num_classes + 1, num_classes + 1))
    m[np.arange(num_classes), np.arange(num_classes)] += 300
    m[0] = 0  # a class without ground truth: its normalised row is empty, not nan text
    cm = ConfusionMatrix(m, names)
    for normalize in (False, True):
        fig = confusion_figure(cm, normalize)
        renderer = _draw(fig)
        assert _inside(fig, fig._suptitle, renderer) and "Confusion matrix" in fig._suptitle.get_text()
        ax = fig.axes[0]
        assert not any(line.get_visible() for line in ax.get_xgridlines() + ax.get_ygridlines())
        for label in ax.get_xticklabels() + ax.get_yticklabels():
            assert _inside(fig, label, renderer), label.get_text()
        texts = [t for t in ax.texts]
        assert all(t.get_text() != "nan" for t in texts)
        # text colour by the cell's brightness: white on the dark diagonal, black on light cells
        diag = [t for t in texts if t.get_position() == (1, 1) or (num_classes == 1 and t.get_position() == (0, 0))]
        if diag and m[diag[0].get_position()[1], diag[0].get_position()[0]] >= 300:
            assert diag[0].get_color() == "white"
    share = row_normalised(cm)
    assert np.isnan(share[0]).all() and np.allclose(share[1:][m[1:].sum(1) > 0].sum(1), 1)
    gt, results, names3, _ = _scene(3)
    fig = pr_curves_figure(Evaluator(names3).compute(gt, results, extras=False).coco)
    assert _inside(fig, fig._suptitle)


def test_training_curves_from_metrics_csv(tmp_path):
    rows = read_metrics_csv(_metrics_csv(tmp_path / "metrics.csv"))
    assert sum("train/loss" in r for r in rows) == 60 and sum("val/mAP" in r for r in rows) == 3
    fig = training_curves_figure(rows)
    assert len(fig.axes) == 3  # losses, AP, learning rate
    loss_ax, ap_ax, _ = fig.axes
    assert {line.get_label() for line in ap_ax.get_lines()} == {"val/mAP", "val/AP50", "val/AP75"}
    assert any(line.get_label() == "val/loss" for line in loss_ax.get_lines())
    renderer = _draw(fig)
    for ax in fig.axes:
        assert _inside(fig, ax.title, renderer)


def test_report_without_training_run_says_why(tmp_path):
    gt, results, names, _ = _scene(3)
    ev = Evaluator(names, error_breakdown=False)
    written = ev.write(ev.compute(gt, results, stage="test"), tmp_path)
    assert "training_curves.png" not in {p.name for p in written}
    page = (tmp_path / "report.html").read_text()
    assert "no training curves" in page and "test_pr_curves.png" in page
