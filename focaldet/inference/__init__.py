"""Inference beyond one forward pass per image: sliced inference for large images (`slicing`)."""

from focaldet.inference.slicing import Slicing, merge_detections, shift_boxes, slice_windows, sliced_detections

__all__ = ["Slicing", "merge_detections", "shift_boxes", "slice_windows", "sliced_detections"]
