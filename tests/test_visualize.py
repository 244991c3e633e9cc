"""Tests of focaldet.visualize: drawing detections and packing them into contact sheets."""

import numpy as np
import pytest
import torch
from PIL import Image

from focaldet.visualize import (
    GT_COLOR,
    GT_DASH_COLOR,
    SHEET_BACKGROUND,
    class_color,
    detection_grid,
    draw_detections,
    font_size,
    line_width,
    pack_rows,
    save_detection_grid,
    text_color_on,
    threshold_text,
)

NAMES = ["cat", "dog"]
# portrait, landscape, square, tiny, panorama, huge: the mixed sizes of a small photo set (h, w)
MIXED = [(480, 640), (460, 240), (240, 320), (96, 96), (200, 800), (2000, 1000), (380, 260), (64, 128)]


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
    # The confident box's left edge is solid in class 1's colour (below its tag); the low-score box is not drawn.
    assert all(tuple(out[:, y, 10].tolist()) == class_color(1) for y in range(28, 50))
    assert out[:, 20, 75].sum() == 0 and out[:, 30, 60].sum() == 0


def test_ground_truth_is_dashed_black_and_white_so_it_differs_from_predictions_without_colour():
    gray = torch.rand(1, 50, 50)
    target = {"boxes": torch.tensor([[5.0, 5.0, 30.0, 30.0]]), "labels": torch.tensor([0])}
    out = draw_detections(gray, _det([], [], []), NAMES, target=target)
    assert out.shape == (3, 50, 50) and out.dtype == torch.uint8
    edge = {tuple(out[:, y, 5].tolist()) for y in range(6, 30)}
    assert edge == {GT_COLOR, GT_DASH_COLOR}


def test_tag_text_colour_follows_the_tag_brightness_and_sizes_follow_the_image():
    assert text_color_on((255, 255, 0)) == (0, 0, 0) and text_color_on((31, 40, 120)) == (255, 255, 255)
    assert line_width(300, 300) == 2 and line_width(1600, 1600) == 10
    assert font_size(100, 100) == 11 and font_size(600, 600) == 27 and font_size(4000, 4000) == 40
    # a label tag is drawn with text inside it: the tag holds both the class colour and the text colour
    image = torch.full((3, 200, 200), 128, dtype=torch.uint8)
    out = draw_detections(image, _det([[50, 80, 150, 180]], [0.9], [0]), NAMES)
    tag = out[:, 60:80, 50:100].permute(1, 2, 0).reshape(-1, 3)
    colours = {tuple(c) for c in tag.tolist()}
    assert class_color(0) in colours and (tag > 230).all(dim=1).any()  # white (anti-aliased) text on blue


def test_class_colour_is_stable():
    assert class_color(3) == class_color(3) and class_color(0) != class_color(1)


def test_pack_rows_fills_the_width_with_rows_of_equal_height_at_each_aspect_ratio():
    tiles, (sheet_h, sheet_w) = pack_rows(MIXED, width=1200, row_height=240, gap=4)
    assert sheet_w == 1200
    rows = {}
    for (x, y, w, h), (ih, iw) in zip(tiles, MIXED):
        rows.setdefault(y, []).append((x, w, h))
        assert w / h == pytest.approx(iw / ih, rel=0.05)  # aspect kept (rounding, last tile of a row)
        assert 0 <= x and x + w <= sheet_w and y + h <= sheet_h
    ys = sorted(rows)
    for y in ys:
        assert len({h for _, _, h in rows[y]}) == 1  # one height per row
        xs = sorted(rows[y])
        assert all(a[0] + a[1] + 4 == b[0] for a, b in zip(xs, xs[1:]))  # no overlap, no hole
    for y in ys[:-1]:  # every row but the last ends at the sheet's right edge
        x, w, _ = max(rows[y])
        assert x + w == 1200 - 4
    # at most 2 per row when asked
    tiles, _ = pack_rows(MIXED, width=1200, row_height=240, max_per_row=2)
    assert max(sum(t[1] == y for t in tiles) for y in {t[1] for t in tiles}) <= 2


@pytest.mark.parametrize("num_classes", [1, 3, 80])
def test_sheet_of_mixed_sizes_has_no_black_cells_bounded_size_and_the_threshold_written(num_classes, tmp_path):
    gen = torch.Generator().manual_seed(num_classes)
    names = [f"class_{k}" for k in range(num_classes)]
    images, dets, targets = [], [], []
    for i, (h, w) in enumerate(MIXED):
        images.append(torch.randint(60, 200, (3, h, w), dtype=torch.uint8, generator=gen))
        xy = torch.rand(6, 2, generator=gen) * torch.tensor([w * 0.6, h * 0.6])
        boxes = torch.cat([xy, xy + torch.tensor([w * 0.3, h * 0.3])], dim=1)  # (6, 4) xyxy
        labels = torch.randint(0, num_classes, (6,), generator=gen)
        dets.append({"boxes": boxes, "scores": torch.linspace(0.2, 0.95, 6), "labels": labels})
        targets.append({"boxes": boxes + 3, "labels": labels})
    thresholds = [0.5 + 0.001 * k for k in range(num_classes)]
    sheet = detection_grid(images, dets, names, score_threshold=thresholds, targets=targets)
    assert sheet.dtype == torch.uint8 and sheet.shape[0] == 3
    _, h, w = sheet.shape
    assert 800 <= w <= 1920 and 300 <= h <= 1920  # a screen-sized sheet, whatever the image sizes
    pixels = sheet.permute(1, 2, 0).numpy()
    assert (pixels == 0).all(axis=2).mean() < 0.03  # black only in dashes and text: no black padding
    empty = (pixels == np.array(SHEET_BACKGROUND)).all(axis=2).mean()
    assert empty < 0.2  # gaps, header and a short last row only (the old grid: about half)
    text = threshold_text(thresholds, names)
    assert "0.50" in text and (("0.50-0.58 over 80 classes" in text) if num_classes == 80 else ("class_0 0.50" in text))
    Image.fromarray(pixels).save(tmp_path / f"sheet_{num_classes}.png")
    path = save_detection_grid(images[:1], dets[:1], names, tmp_path / "one.png", score_threshold=0.3)
    one = np.asarray(Image.open(path))
    assert one.shape[1] == 640 and one.shape[0] > 480  # one image: its own size, under the header


def test_save_detection_grid_downscales_huge_images_and_keeps_a_single_image_unpadded(tmp_path):
    images = [torch.rand(3, 2000, 1000)]
    path = save_detection_grid(images, [_det([[100, 100, 900, 1900]], [0.7], [1])], NAMES, tmp_path / "g" / "v.png",
                               max_size=200, header=False)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.asarray(Image.open(path)).shape == (200, 100, 3)
    with pytest.raises(ValueError, match="same length"):
        detection_grid(images, [], NAMES)
