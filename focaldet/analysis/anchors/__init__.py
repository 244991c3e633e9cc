"""Anchor statistics of a dataset: best possible recall (BPR) and anchors fitted to the boxes.

**BPR** is the share of boxes that have at least one anchor at IoU >= 0.5 (the matcher's
positive threshold): a box without one is only learnt through the matcher's
``allow_low_quality_matches`` (its best anchor, however poor), if at all. YOLOv5's AutoAnchor
reports a "Best Possible Recall" too, from width/height ratios alone; here it is RetinaNet's
own criterion, the IoU of the box with the anchors *at their grid positions*: every image
is resized as focaldet's eval pipeline does (`InputSettings`: shorter side ``min_size``,
longer side at most ``max_size``), padded to ``size_divisibility``, and the anchors are
exactly those `AnchorGenerator` makes for that padded input. Boxes much smaller than a
level's stride reach IoU 0.5 only when a grid centre happens to lie close to theirs, which
is why position matters.

**Why only the nearest grid centre counts.** For one anchor shape, the overlap of a box and
an anchor along x depends only on their centres' x distance (and shrinks as it grows), the
same along y. So the best anchor of a given shape on a level is the one centred on the grid
point nearest the box's centre (nearest column, nearest row), and the best IoU of a box is
``max over (level, shape)`` of its IoU with that one anchor. `relative_boxes` translates
each box so that its nearest centre on each level is the origin; the IoU with the level's
cell anchors (centred at the origin) is then one `box_iou` per level.

**The fit** (`fit_anchors`) keeps the strides and the number of anchors per location
``A = len(scales) * len(aspect_ratios)`` (so the head's shapes, and pretrained head
weights, still fit) and searches, by coordinate descent on a sample of boxes, the anchor
size of every level (non-decreasing from P3 to P7, as the pyramid's receptive fields grow),
the octave scales, the aspect ratios and the centre offset (0 or 0.5): each step tries a
range of values for one of them with the others fixed and keeps the best by the number of
boxes at IoU >= 0.5 (ties broken towards near misses getting closer), with steps shrinking
from 1/4 to 1/64 octave, from several starting points; a last pass raises the mean best IoU
without losing a box. `unreachable` tells which boxes no anchor shape at all
can reach at the grid positions: the ceiling of any fit with those strides and offset.
"""

from focaldet.analysis.anchors.fit import AnchorFit, fit_anchors, generator_args
from focaldet.analysis.anchors.geometry import (
    AnchorReport,
    InputBoxes,
    best_ious,
    best_possible_recall,
    input_boxes,
    input_sizes,
    relative_boxes,
    unreachable,
)
from focaldet.analysis.anchors.report import (
    AnchorAnalysis,
    DatasetBoxes,
    analyse_anchors,
    check_image_files,
    read_anchor_config,
    read_boxes,
)

__all__ = [
    "AnchorAnalysis",
    "AnchorFit",
    "AnchorReport",
    "DatasetBoxes",
    "InputBoxes",
    "analyse_anchors",
    "best_ious",
    "best_possible_recall",
    "check_image_files",
    "fit_anchors",
    "generator_args",
    "input_boxes",
    "input_sizes",
    "read_anchor_config",
    "read_boxes",
    "relative_boxes",
    "unreachable",
]
