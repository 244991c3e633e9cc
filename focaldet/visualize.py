"""Draw detections on images and pack them into a contact sheet PNG (validate, predict, loggers).

Images are ``(C, H, W)`` tensors, ``uint8`` or float in ``[0, 1]``; detections are
torchvision-style dicts (``boxes`` xyxy in the image's pixels, ``scores``, contiguous
``labels``). Ground truth (``boxes``, ``labels``) can be drawn under the detections.

How a sheet reads without colour: predictions are SOLID boxes in their class colour with a
``"name 0.87"`` tag (text black or white by the tag's brightness); ground truth is a DASHED
black-and-white box (it shows on dark and light photos alike). Line width and font size
follow the size of each drawn tile, so labels stay legible at any image size. Images are
packed by aspect ratio into rows of equal height that fill the sheet's width (no black
padding cells), and a header states the legend and the score threshold drawn.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

# Tableau-like palette of distinguishable colours; class k always gets PALETTE[k % len].
PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (219, 219, 141), (158, 218, 229), (57, 59, 121),
]  # fmt: skip
GT_COLOR = (255, 255, 255)  # ground-truth dashes alternate this with GT_DASH_COLOR
GT_DASH_COLOR = (0, 0, 0)
SHEET_BACKGROUND = (236, 236, 236)  # gaps between tiles and the header: light grey, never black
TEXT_COLOR = (20, 20, 20)


def class_color(label: int) -> tuple[int, int, int]:
    """The stable RGB colour of contiguous class ``label``."""
    return PALETTE[int(label) % len(PALETTE)]


def _to_uint8_rgb(image: Tensor) -> Tensor:
    image = image.detach().cpu()
    if image.dtype != torch.uint8:
        image = (image.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def _valid(boxes: Tensor) -> Tensor:
    """Mask of finite boxes with ``x1 <= x2`` and ``y1 <= y2``."""
    return boxes.isfinite().all(dim=1) & (boxes[:, 0] <= boxes[:, 2]) & (boxes[:, 1] <= boxes[:, 3])


def _name(class_names: Sequence[str], label: int) -> str:
    return class_names[label] if 0 <= label < len(class_names) else str(label)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font at ``size`` px (its fixed bitmap font without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def line_width(height: int, width: int) -> int:
    """Box line width for a drawn tile of ``height x width`` pixels: 2 px up to ~480 px, then 1/160
    of its size (the geometric mean of its sides, so portrait and landscape tiles match)."""
    return max(2, round(math.sqrt(height * width) / 160))


def font_size(height: int, width: int) -> int:
    """Label font size in px for a drawn tile: about 4.5% of its size (geometric mean of its
    sides), 11..40 px."""
    return int(min(40, max(11, round(0.045 * math.sqrt(height * width)))))


def _luminance(rgb: Sequence[float]) -> float:
    """Relative brightness in [0, 1] (Rec. 709 weights on 0..255 channels)."""
    r, g, b = (float(c) / 255 for c in rgb[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def text_color_on(rgb: Sequence[float]) -> tuple[int, int, int]:
    """Black on light backgrounds, white on dark ones."""
    return (0, 0, 0) if _luminance(rgb) > 0.5 else (255, 255, 255)


def _dashed_line(draw: ImageDraw.ImageDraw, p0: tuple[float, float], p1: tuple[float, float], width: int,
                 dash: float) -> None:
    """A straight line of alternating GT_COLOR / GT_DASH_COLOR dashes ``dash`` px long."""
    length = math.hypot(p1[0] - p0[0], p1[1] - p0[1])
    n = max(1, math.ceil(length / dash))
    for i in range(n):
        a, b = i * dash / max(length, 1e-9), min(1.0, (i + 1) * dash / max(length, 1e-9))
        q0 = (p0[0] + a * (p1[0] - p0[0]), p0[1] + a * (p1[1] - p0[1]))
        q1 = (p0[0] + b * (p1[0] - p0[0]), p0[1] + b * (p1[1] - p0[1]))
        draw.line([q0, q1], fill=GT_COLOR if i % 2 == 0 else GT_DASH_COLOR, width=width)


def _dashed_rect(draw: ImageDraw.ImageDraw, box: Sequence[float], width: int) -> None:
    x1, y1, x2, y2 = box
    dash = max(4.0, 3.0 * width)
    for p0, p1 in (((x1, y1), (x2, y1)), ((x2, y1), (x2, y2)), ((x2, y2), (x1, y2)), ((x1, y2), (x1, y1))):
        _dashed_line(draw, p0, p1, width, dash)


def _keep_mask(scores: Tensor, labels: Tensor, score_threshold: float | Sequence[float]) -> Tensor:
    if isinstance(score_threshold, (int, float)):
        return scores >= score_threshold
    thr = torch.as_tensor(list(score_threshold), dtype=torch.float32)  # per class; nan keeps nothing
    return scores >= thr[labels.clamp(0, len(thr) - 1)]


def draw_detections(
    image: Tensor,
    detections: dict[str, Tensor],
    class_names: Sequence[str],
    score_threshold: float | Sequence[float] = 0.3,
    target: dict[str, Tensor] | None = None,
    width: int | None = None,
    font_px: int | None = None,
) -> Tensor:
    """Draw the detections scoring at least ``score_threshold`` (one number, or one per
    class) on ``image``.

    Each detection is a solid box in its class colour (:func:`class_color`) with a tag
    ``"name 0.87"`` (text black or white by the tag's brightness) above it, or inside it at
    the image's top edge; the highest scores are drawn last (on top). If ``target`` is given,
    its ground-truth boxes are drawn first as black-and-white dashes. ``width`` and
    ``font_px`` default to :func:`line_width` / :func:`font_size` of the image's size.

    Returns:
        A new ``uint8`` ``(3, H, W)`` tensor.
    """
    out = _to_uint8_rgb(image)
    h, w = out.shape[-2:]
    width = line_width(h, w) if width is None else int(width)
    font = _font(font_size(h, w) if font_px is None else int(font_px))
    pil = Image.fromarray(out.permute(1, 2, 0).contiguous().numpy())  # (3, H, W) -> (H, W, 3)
    draw = ImageDraw.Draw(pil)
    if target is not None and len(target["boxes"]):
        gt_boxes = target["boxes"].detach().cpu().float().reshape(-1, 4)
        for box in gt_boxes[_valid(gt_boxes)].tolist():
            _dashed_rect(draw, box, max(1, width - 1))

    boxes = detections["boxes"].detach().cpu().float().reshape(-1, 4)
    scores = detections["scores"].detach().cpu().float().reshape(-1)
    labels = detections["labels"].detach().cpu().long().reshape(-1)
    keep = _keep_mask(scores, labels, score_threshold) & _valid(boxes)
    if keep.any():
        order = torch.argsort(scores[keep])  # ascending: the most confident drawn last, on top
        boxes, scores, labels = boxes[keep][order], scores[keep][order], labels[keep][order]
        for box, lab in zip(boxes.tolist(), labels.tolist()):
            draw.rectangle(box, outline=class_color(lab), width=width)
        for box, score, lab in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            _tag(draw, box, f"{_name(class_names, lab)} {score:.2f}", class_color(lab), font, (w, h))
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


def _tag(draw: ImageDraw.ImageDraw, box: Sequence[float], text: str, color: tuple[int, int, int], font,
         size: tuple[int, int]) -> None:
    """A filled label tag at the box's top-left corner: above the box, or inside it when
    there is no room above; kept within the image horizontally."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(1, round((bottom - top) * 0.2))
    tw, th = right - left + 2 * pad, bottom - top + 2 * pad
    x = min(max(0.0, box[0]), max(0.0, size[0] - tw))
    y = box[1] - th if box[1] - th >= 0 else max(0.0, box[1])
    draw.rectangle([x, y, x + tw - 1, y + th - 1], fill=color)
    draw.text((x + pad - left, y + pad - top), text, fill=text_color_on(color), font=font)


def _fit(image: Tensor, boxes_dicts: Sequence[dict[str, Tensor] | None], size: tuple[int, int]):
    """Resize ``image`` to ``size`` = (h, w), boxes along with it."""
    h, w = image.shape[-2:]
    if (h, w) == tuple(size):
        return image, list(boxes_dicts)
    image = TF.resize(image, list(size), antialias=True)
    factor = torch.tensor([size[1] / w, size[0] / h, size[1] / w, size[0] / h])
    scaled = [None if d is None else {**d, "boxes": d["boxes"].detach().cpu().float().reshape(-1, 4) * factor}
              for d in boxes_dicts]
    return image, scaled


def pack_rows(sizes: Sequence[tuple[int, int]], width: int, row_height: int, gap: int = 4,
              max_per_row: int | None = None) -> tuple[list[tuple[int, int, int, int]], tuple[int, int]]:
    """Lay images of ``sizes`` ((h, w) each), in order, into rows of equal height that fill ``width``.

    A "justified" layout (as photo galleries do): each row takes images at their aspect ratio
    until it is about ``width`` wide at ``row_height``, then is scaled to exactly ``width``
    (a row ends where its height comes closest to ``row_height``). The last row is scaled
    the same way but never taller than ``row_height``, so it may end short. At most
    ``max_per_row`` images per row when given.

    Returns:
        ``(x, y, w, h)`` of each tile in pixels, and the sheet's ``(height, width)``; tiles
        are ``gap`` px apart and from the edges.
    """
    aspects = [max(w, 1) / max(h, 1) for h, w in sizes]
    inner = width - 2 * gap

    def justified(members: list[int]) -> float:  # the height at which ``members`` fill the width
        return (inner - gap * (len(members) - 1)) / sum(aspects[j] for j in members)

    rows: list[tuple[list[int], bool]] = []  # (members, fills the width)
    row: list[int] = []
    for i in range(len(aspects)):
        row.append(i)
        h_with = justified(row)
        if len(row) > 1 and h_with < row_height and justified(row[:-1]) / row_height < row_height / h_with:
            rows.append((row[:-1], True))  # the row is closer to row_height without image i
            row = [i]
            h_with = justified(row)
        if h_with <= row_height:
            rows.append((row, True))
            row = []
        elif max_per_row is not None and len(row) >= max_per_row:
            rows.append((row, False))
            row = []
    if row:
        rows.append((row, False))  # the last row: not stretched past row_height
    tiles: list[tuple[int, int, int, int]] = [(0, 0, 0, 0)] * len(sizes)
    y = gap
    for members, fills in rows:
        full = justified(members)
        h = full if fills else min(full, row_height)
        h_px = max(1, round(h))
        x = gap
        for k, j in enumerate(members):
            w_px = max(1, round(aspects[j] * h))
            if k == len(members) - 1 and h == full:
                w_px = max(1, inner + gap - x)  # a full row ends exactly at the sheet's edge
            tiles[j] = (x, y, w_px, h_px)
            x += w_px + gap
        y += h_px + gap
    sheet_w = max(x + w for x, _, w, _ in tiles) + gap
    return tiles, (y, sheet_w)


def sheet_width(sizes: Sequence[tuple[int, int]], row_height: int, max_width: int, gap: int = 4) -> int:
    """A sheet width for ``sizes`` giving a roughly 16:10 sheet of rows ``row_height`` tall,
    at most ``max_width`` and at least the widest image at ``row_height``."""
    aspects = [max(w, 1) / max(h, 1) for h, w in sizes]
    strip = sum(aspects) * row_height + gap * (len(aspects) + 1)  # every image in one row
    rows = max(1.0, math.sqrt(strip / (1.6 * row_height)))
    widest = max(aspects) * row_height + 2 * gap
    return int(round(min(max_width, max(widest, strip / rows))))


def _best_packing(sizes, width: int, max_width: int, row_height: int, gap: int, max_per_row: int | None):
    """:func:`pack_rows` at the width, among 25 from 0.7x :func:`sheet_width` to ``max_width``,
    that best balances little empty space (a short last row), a sheet near 16:10 and rows
    near ``row_height``."""
    best = None
    for cand in np.linspace(0.7 * width, max(width, max_width), 25):
        tiles, (h, w) = pack_rows(sizes, int(round(cand)), row_height, gap, max_per_row)
        used = sum((tw + gap) * (th + gap) for _, _, tw, th in tiles)
        empty = 1 - used / (h * w)
        stretch = sum(abs(math.log(th / row_height)) for _, _, _, th in tiles) / len(tiles)
        score = empty + 0.15 * abs(math.log((w / h) / 1.6)) + 0.3 * stretch
        if best is None or score < best[0]:
            best = (score, tiles, (h, w))
    return best[1], best[2]


def threshold_text(score_threshold: float | Sequence[float], class_names: Sequence[str], max_listed: int = 6) -> str:
    """What a sheet says about the score threshold it was drawn at."""
    if isinstance(score_threshold, (int, float)):
        return f"drawn: score >= {float(score_threshold):.2f}"
    pairs = [(_name(class_names, k), t) for k, t in enumerate(score_threshold)]
    if len(pairs) <= max_listed:
        listed = ", ".join(f"{n} {'-' if math.isnan(t) else f'{t:.2f}'}" for n, t in pairs)
        return f"drawn: score >= per-class threshold ({listed})"
    finite = [t for _, t in pairs if not math.isnan(t)]
    if finite and min(finite) == max(finite):
        return f"drawn: score >= {finite[0]:.2f} (per-class threshold, the same for all {len(pairs)} classes)"
    span = f"{min(finite):.2f}-{max(finite):.2f}" if finite else "none"
    return f"drawn: score >= per-class threshold ({span} over {len(pairs)} classes)"


def _header(width: int, text: str, font_px: int, gap: int) -> np.ndarray:
    """The sheet's header strip ``(H, width, 3)``: the legend (a dashed sample = ground truth,
    a solid one = prediction) and ``text`` (the threshold), flowed over as many lines as the
    width needs."""
    font = _font(font_px)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    sample, lw, space = 3 * font_px, max(2, font_px // 6), probe.textlength(" ", font=font)
    # (sample kind or None, text): a legend entry keeps its sample and words together
    items = []
    for kind, words in (("gt", "ground truth"), ("pred", "prediction (class colour, name score)"), (None, text)):
        first, *rest = words.split(" ")
        items += [(kind, first)] + [(None, word) for word in rest]  # a sample goes with its first word
    placed, x, line = [], gap, 0
    for kind, word in items:
        w = probe.textlength(word, font=font) + (sample + font_px // 2 if kind else 0)
        lead = font_px if kind or word == text.split(" ")[0] else space
        if placed and x + lead + w > width - gap:
            x, line = gap, line + 1
        elif placed:
            x += lead
        placed.append((x, kind, word, line))
        x += w
    line_h = round(font_px * 1.35)
    img = Image.new("RGB", (width, 2 * gap + line_h * (line + 1)), SHEET_BACKGROUND)
    draw = ImageDraw.Draw(img)
    for x, kind, word, k in placed:
        mid = gap + line_h * k + line_h / 2
        if kind == "gt":
            _dashed_line(draw, (x, mid), (x + sample, mid), lw, max(4.0, 3.0 * lw))
        elif kind == "pred":
            draw.line([(x, mid), (x + sample, mid)], fill=class_color(0), width=lw)
        if kind:
            x += sample + font_px // 2
        draw.text((x, mid), word, fill=TEXT_COLOR, font=font, anchor="lm")
    return np.asarray(img)


def save_detection_grid(
    images: Sequence[Tensor],
    detections_list: Sequence[dict[str, Tensor]],
    class_names: Sequence[str],
    path: str | os.PathLike,
    ncols: int | None = None,
    score_threshold: float | Sequence[float] = 0.3,
    targets: Sequence[dict[str, Tensor]] | None = None,
    max_size: int = 640,
    **kwargs,
) -> Path:
    """Save :func:`detection_grid` as a PNG."""
    grid = detection_grid(images, detections_list, class_names, ncols, score_threshold, targets, max_size, **kwargs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)  # torchvision.io is deprecated (0.29)
    return path


def detection_grid(
    images: Sequence[Tensor],
    detections_list: Sequence[dict[str, Tensor]],
    class_names: Sequence[str],
    ncols: int | None = None,
    score_threshold: float | Sequence[float] = 0.3,
    targets: Sequence[dict[str, Tensor]] | None = None,
    max_size: int = 640,
    row_height: int = 360,
    max_width: int = 1920,
    header: bool = True,
) -> Tensor:
    """Draw each image's detections (and ground truth) and pack them into a sheet: a
    ``uint8 (3, H, W)`` tensor.

    One image is drawn at its own size (longer side at most ``max_size``). Several are
    packed by :func:`pack_rows` into rows about ``row_height`` px tall (less for small
    images, never under 160 px) on a sheet at most ``max_width`` wide (:func:`sheet_width`),
    at most ``ncols`` per row when given; each image is resized to its tile BEFORE drawing,
    so line width and label size follow the tile. ``score_threshold`` is one number or one
    per class (e.g. the F1 thresholds); with ``header`` the sheet starts with the legend and
    that threshold.
    """
    if len(images) != len(detections_list) or (targets is not None and len(targets) != len(images)):
        raise ValueError("images, detections_list and targets must have the same length")
    if not images:
        raise ValueError("no images to draw")
    gap = 4
    sizes = [tuple(int(s) for s in im.shape[-2:]) for im in images]
    if len(images) == 1:
        h, w = sizes[0]
        scale = min(1.0, max_size / max(h, w))
        tiles = [(0, 0, max(1, round(w * scale)), max(1, round(h * scale)))]
        canvas_hw = (tiles[0][3], tiles[0][2])
    else:
        median_h = sorted(h * min(1.0, max_size / max(h, w)) for h, w in sizes)[len(sizes) // 2]
        rh = int(min(row_height, max(160, median_h)))
        tiles, canvas_hw = _best_packing(sizes, sheet_width(sizes, rh, max_width, gap), max_width, rh, gap, ncols)
    canvas = np.full((*canvas_hw, 3), SHEET_BACKGROUND, dtype=np.uint8)
    for i, (image, det) in enumerate(zip(images, detections_list)):
        x, y, w, h = tiles[i]
        image, (det, tgt) = _fit(_to_uint8_rgb(image), [det, None if targets is None else targets[i]], (h, w))
        drawn = draw_detections(image, det, class_names, score_threshold, target=tgt)
        canvas[y:y + h, x:x + w] = drawn.permute(1, 2, 0).numpy()  # (3, h, w) -> (h, w, 3)
    if header:
        font_px = int(min(22, max(12, round(canvas.shape[1] / 70))))
        strip = _header(canvas.shape[1], threshold_text(score_threshold, class_names), font_px, gap)
        canvas = np.concatenate([strip, canvas], axis=0)
    return torch.from_numpy(np.ascontiguousarray(canvas)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
