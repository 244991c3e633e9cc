"""Evaluation of focaldet detections: COCO metrics (:mod:`~focaldet.evaluation.coco`), F1
score thresholds (:mod:`~focaldet.evaluation.thresholds`), confusion matrix
(:mod:`~focaldet.evaluation.confusion`), TIDE error breakdown
(:mod:`~focaldet.evaluation.errors`), the :class:`Evaluator` that runs them for
``validate`` / ``test`` (:mod:`~focaldet.evaluation.evaluator`), and the ``report.html`` page
that shows a run (:mod:`~focaldet.evaluation.report`)."""

from focaldet.evaluation.coco import (
    STAT_NAMES,
    CocoEvalResult,
    detections_to_coco,
    evaluate_coco,
    evaluate_distributed,
    gather_results,
    merge_rank_results,
    on_rank_zero,
    plot_pr_curves,
    pr_curves_figure,
    write_results_json,
)
from focaldet.evaluation.confusion import ConfusionMatrix, confusion_matrix
from focaldet.evaluation.errors import tide_errors
from focaldet.evaluation.evaluator import EvalReport, EvaluationSettings, Evaluator
from focaldet.evaluation.thresholds import f1_thresholds, load_thresholds

__all__ = [
    "STAT_NAMES",
    "CocoEvalResult",
    "ConfusionMatrix",
    "EvalReport",
    "EvaluationSettings",
    "Evaluator",
    "confusion_matrix",
    "detections_to_coco",
    "evaluate_coco",
    "evaluate_distributed",
    "f1_thresholds",
    "gather_results",
    "load_thresholds",
    "merge_rank_results",
    "on_rank_zero",
    "plot_pr_curves",
    "pr_curves_figure",
    "tide_errors",
    "write_results_json",
]
