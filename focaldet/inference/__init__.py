"""Inference: the one predictor (`predictor`) and sliced inference for large images (`slicing`)."""

from focaldet.inference.predictor import PredictionSettings, Predictor, read_thresholds, size_groups
from focaldet.inference.slicing import Slicing, merge_detections, shift_boxes, slice_windows, sliced_detections

__all__ = ["PredictionSettings", "Predictor", "Slicing", "read_thresholds", "size_groups", "merge_detections", "shift_boxes", "slice_windows", "sliced_detections"]
