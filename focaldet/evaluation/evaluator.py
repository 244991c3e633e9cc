"""``Evaluator``: what ``validate`` / ``test`` (and each validation inside ``fit``) report.

The steps are apart, so that each output plugs in without growing the Lightning module:

1. :meth:`Evaluator.compute` (a collective under DDP): gathers every rank's COCO results,
   evaluates on rank 0 (COCO's 12 numbers and per-class AP; with ``extras`` also the F1
   thresholds, the confusion matrix and TIDE's error breakdown) and broadcasts the
   :class:`EvalReport`, so every rank logs the same numbers;
2. :meth:`Evaluator.metrics`: the scalars to log (``{stage}/mAP`` ..., ``{stage}/AP/<class>``);
3. :meth:`Evaluator.summary`: the text tables to print;
4. :meth:`Evaluator.write`: the files of the run folder (rank 0);
5. :meth:`Evaluator.log_images`: detections and PR curves to image-capable loggers
   (TensorBoard, W&B).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from focaldet.config.recipe import dataclass_of
from focaldet.errors import ConfigError
from focaldet.evaluation.coco import (
    BACKENDS,
    DEFAULT_BACKEND,
    CocoEvalResult,
    evaluate_coco,
    gather_results,
    on_rank_zero,
    plot_pr_curves,
    pr_curves_figure,
    write_results_json,
)
from focaldet.evaluation.confusion import ConfusionMatrix, confusion_matrix, plot_confusion, write_confusion_csv
from focaldet.evaluation.errors import errors_table, plot_errors, tide_available, tide_errors, write_errors
from focaldet.evaluation.report import draw_training_curves, write_report
from focaldet.evaluation.thresholds import ALL, f1_thresholds, thresholds_table, write_thresholds


@dataclass
class EvalReport:
    """Everything one evaluation computed (the extras are None when not computed)."""

    stage: str
    coco: CocoEvalResult
    num_images: int
    thresholds: dict[str, dict[str, float]] | None = None
    confusion: ConfusionMatrix | None = None
    errors: dict[str, Any] | None = None

    def class_thresholds(self) -> list[float] | None:
        """The F1 threshold of each class in class order (nan where not computable)."""
        if self.thresholds is None:
            return None
        return [self.thresholds[n]["score"] for n in self.coco.class_names]


@dataclass
class EvaluationSettings:
    """How ``validate``, ``test`` and ``fit``'s validations score detections
    (``RetinaNetModule(evaluation=...)``, ``--model.evaluation.max_dets 300``).

    Args:
        backend: ``"faster_coco_eval"`` (default) or ``"pycocotools"`` (the same numbers, slower).
        max_dets: detections per image COCOeval evaluates (COCO's 100); for crowded scenes
            raise it together with ``model.model.postprocess.detections_per_img``.
    """

    backend: str = DEFAULT_BACKEND
    max_dets: int = 100

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"evaluation.backend must be one of {BACKENDS}, got {self.backend!r}")
        if not isinstance(self.max_dets, int) or self.max_dets < 1:
            raise ConfigError(f"evaluation.max_dets must be a positive integer, got {self.max_dets!r}")

    @classmethod
    def of(cls, value: EvaluationSettings | Mapping[str, Any] | None) -> EvaluationSettings:
        """From itself, a mapping of its fields (YAML, checkpoints) or None (the defaults)."""
        return dataclass_of(cls, value, "evaluation") or cls()

    def evaluator(self, class_names: Sequence[str]) -> Evaluator:
        return Evaluator(class_names, backend=self.backend, max_dets=self.max_dets)


class Evaluator:
    """COCO evaluation plus the deployment outputs of ``focaldet validate``.

    Args:
        class_names: names of the contiguous labels (category-id order).
        backend: ``"faster_coco_eval"`` (default) or ``"pycocotools"`` (:func:`evaluate_coco`).
        max_dets: detections per image evaluated (COCO's 100); see :func:`evaluate_coco`.
        error_breakdown: compute TIDE's breakdown with the extras (needs ``tidecv``, the
            ``analysis`` extra; skipped with a note when it is not installed).
    """

    def __init__(self, class_names: Sequence[str], backend: str = DEFAULT_BACKEND, max_dets: int = 100,
                 error_breakdown: bool = True):
        self.class_names = [str(n) for n in class_names]
        self.backend = backend
        self.max_dets = int(max_dets)
        self.error_breakdown = error_breakdown

    # ------------------------------------------------------------------ 1. compute
    def compute(self, coco_gt: Any, local_results: Sequence[dict], stage: str = "val", extras: bool = True,
                results_path: str | Path | None = None) -> EvalReport:
        """Evaluate every rank's results (a collective under DDP: call it on every rank).

        ``results_path``: also write the merged COCO results there (rank 0).
        ``extras``: also compute thresholds, confusion matrix and error breakdown.
        """
        results = gather_results(local_results)
        return on_rank_zero(lambda: self._compute(coco_gt, results, stage, extras, results_path))

    def _compute(self, coco_gt: Any, results: list[dict], stage: str, extras: bool,
                 results_path: str | Path | None) -> EvalReport:
        if results_path is not None:
            write_results_json(results, results_path)
        coco = evaluate_coco(coco_gt, results, self.backend, self.class_names, max_dets=self.max_dets)
        report = EvalReport(stage, coco, len(coco_gt.getImgIds()))
        if not extras:
            return report
        report.thresholds = f1_thresholds(coco.matches, coco.class_names)
        cat_ids = sorted(coco_gt.getCatIds())
        report.confusion = confusion_matrix(coco_gt.dataset, results, cat_ids, coco.class_names,
                                            report.class_thresholds(), iou=0.5, max_dets=self.max_dets)
        if self.error_breakdown and tide_available():
            report.errors = tide_errors(coco_gt.dataset, results, max_dets=self.max_dets)
        return report

    # ------------------------------------------------------------------ 2. log
    def metrics(self, report: EvalReport) -> dict[str, float]:
        """``{stage}/<COCO number>``, ``{stage}/AP/<class>`` and ``{stage}/AP50/<class>``
        (classes without ground truth left out)."""
        s = report.stage
        out = {f"{s}/{k}": float(v) for k, v in report.coco.stats.items()}
        for name in report.coco.class_names:
            for key, table in (("AP", report.coco.per_class), ("AP50", report.coco.per_class_ap50)):
                if not math.isnan(table[name]):
                    out[f"{s}/{key}/{name}"] = float(table[name])
        return out

    # ------------------------------------------------------------------ 3. print
    def summary(self, report: EvalReport) -> str:
        """The tables ``validate`` prints: COCO numbers, per-class AP, thresholds, errors."""
        c = report.coco
        parts = [f"COCO bbox evaluation ({report.stage}, {report.num_images} images, maxDets {c.max_dets})",
                 c.table(), "", c.per_class_table()]
        if report.thresholds is not None:
            parts += ["", "Score thresholds maximising F1 at IoU 0.5", thresholds_table(report.thresholds)]
        if report.errors is not None:
            parts += ["", errors_table(report.errors)]
        elif report.thresholds is not None and self.error_breakdown:
            why = ("no detections or no ground truth" if tide_available()
                   else "`pip install focaldet[analysis]` installs tidecv")
            parts += ["", f"(TIDE error breakdown skipped: {why})"]
        return "\n".join(parts)

    # ------------------------------------------------------------------ 4. draw / write
    def write(self, report: EvalReport, out: str | Path, preview: tuple | None = None,
              draw_score_threshold: float = 0.3, train_metrics: str | Path | None = None) -> list[Path]:
        """Write the run folder's files (rank 0) and return their paths:

        ``{stage}_pr_curves.png``, ``{stage}_detections.png`` (``preview`` = images,
        detections, targets of a batch; drawn at the F1 thresholds when known), with the
        extras ``thresholds.json``, ``confusion_matrix.csv/.png``,
        ``confusion_matrix_normalized.png``, ``errors.json`` and ``errors.png``; then
        ``training_curves.png`` when ``train_metrics`` (the training run's ``metrics.csv``)
        holds a training loss, and last ``report.html``, the page that shows them all.
        """
        out = Path(out)
        stage = report.stage
        written = [plot_pr_curves(report.coco, out / f"{stage}_pr_curves.png")]
        if preview is not None:
            from focaldet.visualize import save_detection_grid

            images, detections, targets = preview
            written.append(save_detection_grid(images, detections, self.class_names, out / f"{stage}_detections.png",
                                               targets=targets,
                                               score_threshold=self._draw_thresholds(report, draw_score_threshold)))
        if report.thresholds is not None:
            written.append(write_thresholds(report.thresholds, out / "thresholds.json"))
        if report.confusion is not None:
            written.append(write_confusion_csv(report.confusion, out / "confusion_matrix.csv"))
            written.append(plot_confusion(report.confusion, out / "confusion_matrix.png"))
            written.append(plot_confusion(report.confusion, out / "confusion_matrix_normalized.png", normalize=True))
        if report.errors is not None:
            written.append(write_errors(report.errors, out / "errors.json"))
            written.append(plot_errors(report.errors, out / "errors.png"))
        curves, note = draw_training_curves(train_metrics, out)
        if curves is not None:
            written.append(curves)
        written.append(write_report(report, out, written, train_metrics, note))
        return written

    @staticmethod
    def _draw_thresholds(report: EvalReport, default: float) -> float | list[float]:
        per_class = report.class_thresholds()
        if per_class is None:
            return default
        return [default if math.isnan(t) else t for t in per_class]

    # ------------------------------------------------------------------ 5. images to loggers
    def log_images(self, report: EvalReport, loggers: Iterable[Any], step: int, preview: tuple | None = None,
                   draw_score_threshold: float = 0.3) -> int:
        """Send the validation detections and PR curves to each logger that takes images
        (TensorBoard's ``add_image``, W&B's ``log_image``); returns how many images were sent."""
        images: dict[str, np.ndarray] = {f"{report.stage}/pr_curves": figure_to_array(pr_curves_figure(report.coco))}
        if preview is not None:
            from focaldet.visualize import detection_grid

            imgs, dets, targets = preview
            grid = detection_grid(imgs, dets, self.class_names, targets=targets,
                                  score_threshold=self._draw_thresholds(report, draw_score_threshold))
            images[f"{report.stage}/detections"] = grid.permute(1, 2, 0).numpy()  # (3, H, W) -> (H, W, 3)
        sent = 0
        for logger in loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):  # TensorBoard SummaryWriter
                for tag, image in images.items():
                    experiment.add_image(tag, image, global_step=step, dataformats="HWC")
                    sent += 1
            elif hasattr(logger, "log_image"):  # e.g. WandbLogger
                for tag, image in images.items():
                    logger.log_image(key=tag, images=[image], step=step)
                    sent += 1
        return sent


def figure_to_array(fig: Any) -> np.ndarray:
    """A matplotlib ``Figure`` rendered to a ``uint8 (H, W, 3)`` array (Agg, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


__all__ = ["ALL", "EvalReport", "EvaluationSettings", "Evaluator", "figure_to_array"]
