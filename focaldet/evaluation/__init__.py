"""COCO bbox evaluation of focaldet detections (see :mod:`focaldet.evaluation.coco`)."""

from focaldet.evaluation.coco import (
    STAT_NAMES,
    CocoEvalResult,
    detections_to_coco,
    evaluate_coco,
    evaluate_distributed,
    gather_results,
    merge_rank_results,
    plot_pr_curves,
    write_results_json,
)

__all__ = [
    "STAT_NAMES",
    "CocoEvalResult",
    "detections_to_coco",
    "evaluate_coco",
    "evaluate_distributed",
    "gather_results",
    "merge_rank_results",
    "plot_pr_curves",
    "write_results_json",
]
