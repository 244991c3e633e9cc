"""Tests of focaldet.visualize: drawing detections and writing detection grids."""

import numpy as np
import torch
from PIL import Image

from focaldet.visualize import class_color, draw_detections, save_detection_grid

NAMES = ["cat", "dog"]


def _det(boxes, scores, labels):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def test_draw_detections_draws_only_confident_boxes_in_class_colour():
    image = torch.zeros(3, 60, 80, dtype=torch.uint8)
    det = _det([[10, 10, 40, 50], [50, 5, 70, 30]], [0.9, 0.1], [1, 0])
    out = draw_detections(image, det, NAMES, score_threshold=0.3)
    assert out.dtype == torch.uint8 and out.shape == (3, 60, 80)
    assert image.sum() == 0  # input untouched
    # The confident box's left edge has class 1's colour; the low-score box is not drawn.
    assert tuple(out[:, 30, 10].tolist()) == class_color(1)
    assert out[:, 20, 70].sum() == 0 and out[:, 30, 60].sum() == 0


def test_draw_detections_with_ground_truth_float_and_gray_images():
    gray = torch.rand(1, 50, 50)
    det = _det([], [], [])
    target = {"boxes": torch.tensor([[5.0, 5.0, 30.0, 30.0]]), "labels": torch.tensor([0])}
    out = draw_detections(gray, det, NAMES, target=target)
    assert out.shape == (3, 50, 50) and out.dtype == torch.uint8
    assert tuple(out[:, 15, 5].tolist()) == (255, 255, 255)


def test_class_colour_is_stable():
    assert class_color(3) == class_color(3) and class_color(0) != class_color(1)


def test_save_detection_grid_tiles_images_of_different_sizes(tmp_path):
    images = [
        torch.randint(0, 255, (3, 60, 80), dtype=torch.uint8),
        torch.randint(0, 255, (3, 100, 40), dtype=torch.uint8),
        torch.rand(3, 2000, 1000),  # downscaled to max_size
    ]
    dets = [
        _det([[10, 10, 40, 50]], [0.9], [0]),
        _det([[1, 1, 30, 90], [0, 0, 5, 5]], [0.8, 0.5], [1, 0]),
        _det([[100, 100, 900, 1900]], [0.7], [1]),
    ]
    targets = [{"boxes": d["boxes"], "labels": d["labels"]} for d in dets]
    path = save_detection_grid(images, dets, NAMES, tmp_path / "grid" / "val.png", ncols=2,
                               targets=targets, max_size=200)  # fmt: skip
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    grid = np.asarray(Image.open(path))
    # Cells are 200 x 100 (largest after downscaling), 2 columns x 2 rows, 4 px padding.
    assert grid.shape == (2 * 200 + 3 * 4, 2 * 100 + 3 * 4, 3) and grid.dtype == np.uint8
