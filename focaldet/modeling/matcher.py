"""Anchor-to-ground-truth matching by IoU, batched over the images of a batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from focaldet.modeling.anchors import AnchorGrid

BACKGROUND, IGNORE, FOREGROUND = 0, -1, 1
MAX_IOU_ELEMENTS = 1 << 28  # IoU entries computed at once (1 GiB of fp32): the whole batch on GPU
MAX_IOU_ELEMENTS_CPU = 1 << 18  # on CPU: blocks whose temporaries stay in cache (~10x faster)
# grid_iou has 2 block-sized temporaries instead of ~6: larger blocks, fewer calls pay more
MAX_GRID_IOU_ELEMENTS_CPU = 1 << 20
# culled matching: (box, anchor) pairs whose IoU is computed at once (~20 bytes each per temporary)
MAX_WINDOW_PAIRS = 1 << 22
# relative widening of the culled windows: covers the rounding of the float32 IoU and anchors
WINDOW_SLACK = 1e-4


def pairwise_iou(boxes: Tensor, anchors: Tensor) -> Tensor:
    """IoU of ``boxes (..., G, 4)`` with ``anchors (..., R, 4)``, both xyxy: ``(..., G, R)``.

    ``torchvision.ops.box_iou`` with the same arithmetic (bit-equal results, tested),
    broadcasting over leading dimensions, with ``(..., G, R)`` temporaries only: box_iou's
    ``(G, R, 2)`` corner tensors made the matcher 2.7x slower on the ``loss`` benchmark's
    inputs (0.17 s vs 0.063 s per batch of 8, at the best block size for each).
    """
    b = boxes.unsqueeze(-1)  # (..., G, 4, 1): b[..., k, :] broadcasts against (..., 1, R)
    a = anchors.transpose(-1, -2).contiguous().unsqueeze(-3)  # (..., 1, 4, R), R contiguous
    box_area = (b[..., 2, :] - b[..., 0, :]) * (b[..., 3, :] - b[..., 1, :])  # (..., G, 1)
    anchor_area = (a[..., 2, :] - a[..., 0, :]) * (a[..., 3, :] - a[..., 1, :])  # (..., 1, R)
    iw = torch.minimum(b[..., 2, :], a[..., 2, :]).sub_(torch.maximum(b[..., 0, :], a[..., 0, :])).clamp_(min=0)
    ih = torch.minimum(b[..., 3, :], a[..., 3, :]).sub_(torch.maximum(b[..., 1, :], a[..., 1, :])).clamp_(min=0)
    inter = iw.mul_(ih)  # (..., G, R)
    union = (box_area + anchor_area).sub_(inter)
    return inter.div_(union)


def grid_iou(boxes: Tensor, grid: AnchorGrid, rows: slice) -> Tensor:
    """IoU of ``boxes (..., G, 4)`` with the anchors of grid rows ``rows``:
    ``(..., G, h*W*A)``, columns in the anchors' order.

    Bit-equal to ``pairwise_iou`` with the same anchors materialised (the same float
    operations on the same values), but separable: an anchor's x-overlap with a box depends
    on its column and shape only, its y-overlap on its row and shape only, so the overlaps
    cost ``(h + W) * A`` per box and only the product, union and ratio are ``h * W * A``.
    """
    bx1, by1, bx2, by2 = boxes[..., None, None].unbind(-3)  # each (..., G, 1, 1)
    cell = grid.cell  # (A, 4)
    ax1, ax2 = grid.xs[:, None] + cell[:, 0], grid.xs[:, None] + cell[:, 2]  # (W, A)
    ys = grid.ys[rows, None]
    ay1, ay2 = ys + cell[:, 1], ys + cell[:, 3]  # (h, A)
    iw = torch.minimum(bx2, ax2).sub_(torch.maximum(bx1, ax1)).clamp_(min=0)  # (..., G, W, A)
    ih = torch.minimum(by2, ay2).sub_(torch.maximum(by1, ay1)).clamp_(min=0)  # (..., G, h, A)
    box_area = ((bx2 - bx1) * (by2 - by1))[..., None]  # (..., G, 1, 1, 1)
    anchor_area = (ax2 - ax1)[None] * (ay2 - ay1)[:, None]  # (h, W, A)
    inter = ih.unsqueeze(-2) * iw.unsqueeze(-3)  # (..., G, h, 1, A) * (..., G, 1, W, A) -> (..., G, h, W, A)
    union = (box_area + anchor_area).sub_(inter)
    return inter.div_(union).flatten(-3)  # (..., G, h, W, A) -> (..., G, h*W*A)


def paired_iou(boxes: Tensor, anchors: Tensor) -> Tensor:
    """IoU of ``boxes[i]`` with ``anchors[i]``, both ``(..., 4)`` xyxy: ``(...)``.

    The same float operations, in the same order, as `pairwise_iou`: bit-equal to it.
    """
    bx1, by1, bx2, by2 = boxes.unbind(-1)
    ax1, ay1, ax2, ay2 = anchors.unbind(-1)
    box_area = (bx2 - bx1) * (by2 - by1)
    anchor_area = (ax2 - ax1) * (ay2 - ay1)
    iw = torch.minimum(bx2, ax2).sub_(torch.maximum(bx1, ax1)).clamp_(min=0)
    ih = torch.minimum(by2, ay2).sub_(torch.maximum(by1, ay1)).clamp_(min=0)
    inter = iw.mul_(ih)
    union = (box_area + anchor_area).sub_(inter)
    return inter.div_(union)


class _Windows(NamedTuple):
    """Rectangular windows of grid anchors, one per (box, level, anchor shape): the anchor
    rows ``first + dy * row_step + dx * col_step`` for ``dy < ny, dx < nx``; ``box`` indexes
    the valid boxes. Held as one ``(M, 6)`` int64 tensor, so that spreading the windows over
    their pairs is one gather."""

    packed: Tensor  # (M, 6): box, first, row_step, col_step, nx, ny
    BOX, FIRST, ROW_STEP, COL_STEP, NX, NY = range(6)

    @property
    def size(self) -> Tensor:
        """``(M,)``: the anchors of each window."""
        return self.packed[:, self.NX] * self.packed[:, self.NY]

    def pairs(self) -> tuple[Tensor, Tensor]:
        """Every (box, anchor row) pair of the windows: two ``(P,)`` int64 tensors."""
        size = self.size
        offset = size.cumsum(0) - size  # (M,): the first pair of each window
        win = torch.repeat_interleave(torch.arange(size.shape[0], device=size.device), size)  # (P,)
        w = torch.cat([self.packed, offset[:, None]], 1).index_select(0, win)  # (P, 7): one gather
        k = torch.arange(win.shape[0], device=size.device) - w[:, 6]  # rank of the pair in its window
        dy = k.div(w[:, self.NX], rounding_mode="floor")
        dx = k - dy * w[:, self.NX]
        return w[:, self.BOX], w[:, self.FIRST] + dy * w[:, self.ROW_STEP] + dx * w[:, self.COL_STEP]


def anchor_windows(boxes: Tensor, thresh: Tensor, grid: AnchorGrid, start: int) -> _Windows:
    """For each box of ``boxes (B, 4)`` and each anchor shape of ``grid`` (whose first anchor
    is row ``start``), a window of grid locations holding every anchor of that shape whose
    IoU with the box is ``>= thresh (B,)`` (and, where ``thresh`` is 0, every anchor that
    overlaps the box at all).

    Why it holds: with ``w, h`` the sides of an anchor and ``w', h'`` those of the box, the
    intersection ``iw * ih`` is at most ``iw * min(h, h')`` and the union at least
    ``max(w h, w' h')``, so IoU ``>= t`` needs ``iw >= t max(w h, w' h') / min(h, h')``, at
    most ``min(w, w')`` (else no anchor of that shape qualifies: the size bound); and
    ``iw = min(w, w', (w + w') / 2 - |dx|)`` for centres ``dx`` apart, so
    ``|dx| <= (w + w') / 2 - t max(w h, w' h') / min(h, h')`` (the window); the same in y.
    Computed in float64 and widened by ``WINDOW_SLACK`` (the float32 IoU's rounding).
    """
    b = boxes.double()
    bw, bh = (b[:, 2] - b[:, 0])[:, None], (b[:, 3] - b[:, 1])[:, None]  # (B, 1)
    bcx, bcy = ((b[:, 0] + b[:, 2]) / 2)[:, None], ((b[:, 1] + b[:, 3]) / 2)[:, None]
    cell = grid.cell.double()  # (A, 4)
    aw, ah = cell[:, 2] - cell[:, 0], cell[:, 3] - cell[:, 1]  # (A,)
    acx, acy = (cell[:, 0] + cell[:, 2]) / 2, (cell[:, 1] + cell[:, 3]) / 2
    t = thresh.double()[:, None] * (1 - WINDOW_SLACK)  # (B, 1)
    big = torch.maximum(aw * ah, bw * bh)  # (B, A)
    min_w, min_h = torch.minimum(aw, bw), torch.minimum(ah, bh)
    iw_min, ih_min = t * big / min_h, t * big / min_w  # nan where the box is degenerate: no window
    fits = (iw_min <= min_w) & (ih_min <= min_h) & (bw > 0) & (bh > 0)
    pad = WINDOW_SLACK * (bcx.abs() + bcy.abs() + aw + ah + bw + bh) + 1e-3
    rx, ry = (aw + bw) / 2 - iw_min + pad, (ah + bh) / 2 - ih_min + pad  # (B, A)
    x0, nx = grid.window(bcx - acx - rx, bcx - acx + rx, axis=0)
    y0, ny = grid.window(bcy - acy - ry, bcy - acy + ry, axis=1)
    nx = torch.where(fits, nx, 0)
    a = torch.arange(nx.shape[1], device=boxes.device)  # (A,)
    width, num_shapes = grid.xs.shape[0], nx.shape[1]
    first = start + (y0 * width + x0) * num_shapes + a  # (B, A)
    box = torch.arange(nx.shape[0], device=boxes.device)[:, None].expand_as(nx)
    steps = torch.tensor([width * num_shapes, num_shapes], device=boxes.device).expand(nx.numel(), 2)
    packed = torch.cat([box.reshape(-1, 1), first.reshape(-1, 1), steps, nx.reshape(-1, 1), ny.reshape(-1, 1)], 1)
    return _Windows(packed)  # (B*A, 6)


def probe_iou(boxes: Tensor, anchors: Tensor, grids: Sequence[AnchorGrid]) -> Tensor:
    """A lower bound of each box's best IoU with the anchors: ``(B,)``, the highest IoU of
    ``boxes (B, 4)`` with the anchor of each shape and level whose centre is nearest its own."""
    b = boxes.double()
    bcx, bcy = ((b[:, 0] + b[:, 2]) / 2)[:, None], ((b[:, 1] + b[:, 3]) / 2)[:, None]  # (B, 1)
    best, start = boxes.new_zeros(boxes.shape[0]), 0
    for grid in grids:
        cell = grid.cell.double()  # (A, 4)
        x = grid.nearest(bcx - (cell[:, 0] + cell[:, 2]) / 2, axis=0)  # (B, A)
        y = grid.nearest(bcy - (cell[:, 1] + cell[:, 3]) / 2, axis=1)
        a = torch.arange(cell.shape[0], device=boxes.device)
        row = start + (y * grid.xs.shape[0] + x) * cell.shape[0] + a  # (B, A)
        iou = paired_iou(boxes[:, None].expand(-1, cell.shape[0], -1), anchors[row])  # (B, A)
        best = torch.maximum(best, iou.amax(dim=1))
        start += len(grid)
    return best


class _Block(NamedTuple):
    """A block of anchors: flat rows ``anchors``; for grid anchors also its level and grid rows."""

    anchors: slice
    level: int = -1
    rows: slice = slice(None)


@dataclass
class Matches:
    """Result of matching ``R`` anchors against the ground truth of ``N`` images.

    Attributes:
        gt_index: ``(N, R)`` int64 index of the matched ground-truth box of each anchor
            where ``labels == FOREGROUND``; 0 elsewhere.
        labels: ``(N, R)`` int8: ``1`` foreground, ``0`` background, ``-1`` ignored.
    """

    gt_index: Tensor
    labels: Tensor


class Matcher:
    """IoU matcher of RetinaNet: IoU >= 0.5 foreground, < 0.4 background, in between ignored.

    Args:
        fg_iou_thresh: IoU at and above which an anchor is foreground.
        bg_iou_thresh: IoU below which an anchor is background.
        allow_low_quality_matches: also make foreground, for every ground-truth box, the
            anchors with which it has its highest IoU (so that no object goes unmatched).
            Each such anchor keeps its own best ground truth, as in torchvision/detectron2.
            Unlike them, ground truth that overlaps no anchor at all (IoU 0) adds nothing.
    """

    def __init__(self, fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.4, allow_low_quality_matches: bool = True):
        if bg_iou_thresh > fg_iou_thresh:
            raise ValueError(f"bg_iou_thresh {bg_iou_thresh} > fg_iou_thresh {fg_iou_thresh}")
        self.fg_iou_thresh = fg_iou_thresh
        self.bg_iou_thresh = bg_iou_thresh
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, anchors: Tensor, gt_boxes: Tensor, gt_valid: Tensor,
                 grids: Sequence[AnchorGrid] | None = None) -> Matches:
        """Match ``anchors (R, 4)`` to padded ground truth ``gt_boxes (N, G, 4)``.

        ``gt_valid (N, G)`` bool marks real (non-padding) boxes; ``G`` may be 0. ``grids``,
        optional: the same anchors as `AnchorGrid` levels (``AnchorGenerator.grids``); the
        IoU is then computed with `grid_iou` (same results, fewer operations).
        """
        n, g = gt_valid.shape
        r = anchors.shape[0]
        if g == 0:
            zeros = torch.zeros(n, r, dtype=torch.int64, device=anchors.device)
            return Matches(zeros, zeros.to(torch.int8))
        anchors = anchors.float()
        if grids is not None and self.bg_iou_thresh > 0:
            self._check_grids(r, grids)
            return self._match_culled(anchors, gt_boxes, gt_valid, grids)
        # padding becomes an empty box: IoU 0 with every anchor, so it can neither be a
        # foreground anchor's best box (IoU > 0) nor have a low-quality match (below)
        gt_boxes = torch.where(gt_valid[:, :, None], gt_boxes.float(), 0.0)
        best_iou = anchors.new_empty(n, r)
        # The (N, G, R) IoU is computed in blocks of images x anchors of at most
        # MAX_IOU_ELEMENTS: the whole batch at once on GPU; on CPU cache-sized blocks, whose
        # temporaries are then neither page-faulted nor streamed through memory.
        budget = self._max_iou_elements(anchors.device, grids is not None)
        img_step = max(1, budget // (g * r))
        blocks = self._blocks(r, grids, budget // (g * min(img_step, n)))

        def block_iou(boxes: Tensor, block: _Block) -> Tensor:  # (n_i, G', r_b)
            if block.level < 0:
                return pairwise_iou(boxes, anchors[block.anchors])
            return grid_iou(boxes, grids[block.level], block.rows)

        foreground = torch.empty(n, r, dtype=torch.bool, device=anchors.device)
        for i in range(0, n, img_step):
            imgs = slice(i, i + img_step)
            boxes = gt_boxes[imgs]
            block_max = boxes.new_empty(boxes.shape[0], g, len(blocks))  # (n_i, G, blocks)
            for b, block in enumerate(blocks):
                iou = block_iou(boxes, block)  # (n_i, G, r_b)
                best_iou[imgs, block.anchors] = iou.amax(dim=1)  # amax: ~10x cheaper than max with indices
                block_max[:, :, b] = iou.amax(dim=2)
            foreground[imgs] = best_iou[imgs] >= self.fg_iou_thresh
            if self.allow_low_quality_matches:
                best_per_gt = block_max.amax(dim=2, keepdim=True)  # (n_i, G, 1)
                best_per_gt.masked_fill_(best_per_gt <= 0, 2.0)  # no anchor overlaps: match none
                # Each box's best anchors, in the blocks that hold them only (usually one
                # per box), for the boxes they hold only: recomputing those few IoUs is
                # cheaper than keeping all of them.
                hits = block_max == best_per_gt  # (n_i, G, blocks)
                for b in hits.any(dim=1).any(dim=0).nonzero().flatten().tolist():
                    sub = hits[:, :, b].any(dim=0)  # boxes whose best anchors lie in block b
                    iou = block_iou(boxes[:, sub], blocks[b])
                    # iou <= best_per_gt everywhere, equal exactly at each box's best anchors
                    foreground[imgs, blocks[b].anchors] |= iou.sub_(best_per_gt[:, sub]).amax(dim=1) >= 0
        # The matched box, for the few foreground anchors only: the first best one, as
        # torch.max and torchvision's matcher pick it.
        img, anchor = foreground.nonzero(as_tuple=True)
        iou = pairwise_iou(gt_boxes[img], anchors[anchor, None])  # (P, G, 1)
        gt_index = torch.zeros(n, r, dtype=torch.int64, device=anchors.device)
        gt_index[img, anchor] = iou.squeeze(-1).argmax(dim=1)
        labels = torch.full_like(gt_index, IGNORE, dtype=torch.int8)
        labels.masked_fill_(best_iou < self.bg_iou_thresh, BACKGROUND)
        labels.masked_fill_(foreground, FOREGROUND)
        return Matches(gt_index, labels)

    def _match_culled(self, anchors: Tensor, gt_boxes: Tensor, gt_valid: Tensor,
                      grids: Sequence[AnchorGrid]) -> Matches:
        """The dense path's matches from the IoU of each box with the anchors that can
        matter only: its windows (`anchor_windows`) at threshold ``min(bg_iou_thresh, p)``,
        ``p`` a lower bound of its best IoU (`probe_iou`). They hold every anchor with IoU
        ``>= bg_iou_thresh`` (the foreground, the ignored, and each anchor's best boxes where
        that matters) and each box's best anchors, ties included (the low-quality matches);
        an anchor outside every window is background. Work and memory grow with the
        windows, not with boxes x anchors.
        """
        n, g = gt_valid.shape
        r, dev = anchors.shape[0], anchors.device
        img, col = gt_valid.nonzero(as_tuple=True)  # (B,) each: the valid boxes
        boxes = gt_boxes[img, col].float()  # (B, 4)
        thresh = torch.full_like(boxes[:, 0], self.bg_iou_thresh)
        if self.allow_low_quality_matches:
            thresh = torch.minimum(thresh, probe_iou(boxes, anchors, grids))
        starts = [0]
        for grid in grids[:-1]:
            starts.append(starts[-1] + len(grid))
        windows = torch.cat([anchor_windows(boxes, thresh, grid, start).packed for grid, start in zip(grids, starts)])
        windows = _Windows(windows[windows[:, _Windows.NX] * windows[:, _Windows.NY] > 0])
        # The pairs whose IoU may matter, computed MAX_WINDOW_PAIRS at a time: those with
        # IoU >= min(bg_iou_thresh, the box's bound), which holds all the pairs used below.
        keep_thresh = thresh * (1 - WINDOW_SLACK)
        chunk = windows.size.cumsum(0).div(MAX_WINDOW_PAIRS, rounding_mode="floor")
        box_base = img * r  # (B,): the flat (N * R) index of each box's image's first anchor
        kept_box, kept_anchor, kept_iou = [], [], []
        ends = torch.unique_consecutive(chunk, return_counts=True)[1].cumsum(0).tolist()
        for lo, hi in zip([0, *ends[:-1]], ends):
            box, row = _Windows(windows.packed[lo:hi]).pairs()  # (P,) each
            iou = paired_iou(boxes.index_select(0, box), anchors.index_select(0, row))  # (P,)
            keep = (iou >= keep_thresh.index_select(0, box)).nonzero().squeeze(1)  # (P',)
            box = box.index_select(0, keep)
            kept_box.append(box)
            kept_anchor.append(box_base.index_select(0, box) + row.index_select(0, keep))  # flat (N * R) index
            kept_iou.append(iou.index_select(0, keep))
        box = torch.cat(kept_box) if kept_box else torch.zeros(0, dtype=torch.int64, device=dev)
        anchor = torch.cat(kept_anchor) if kept_anchor else box
        iou = torch.cat(kept_iou) if kept_iou else anchors.new_zeros(0)

        best_iou = anchors.new_zeros(n * r).scatter_reduce_(0, anchor, iou, "amax")  # (N*R,)
        foreground = best_iou >= self.fg_iou_thresh
        if self.allow_low_quality_matches:
            best_per_gt = boxes.new_zeros(boxes.shape[0]).scatter_reduce_(0, box, iou, "amax")  # (B,)
            # each box's best anchors, ties included; a box that overlaps no anchor adds nothing
            foreground[anchor[(iou == best_per_gt.index_select(0, box)) & (iou > 0)]] = True
        # The matched box: the first best one, as torch.max and torchvision's matcher pick
        # it. Where the best IoU is >= bg_iou_thresh every box that reaches it was kept;
        # for the few low-quality matches below it, all the boxes of the image are compared.
        first = (iou == best_iou.index_select(0, anchor)) & (iou >= self.bg_iou_thresh)
        gt_index = torch.full((n * r,), g, dtype=torch.int64, device=dev)
        gt_index.scatter_reduce_(0, anchor[first], col[box[first]], "amin")
        low = (foreground & (best_iou < self.bg_iou_thresh)).nonzero().flatten()  # flat (N*R) indices
        if low.numel():
            gt = torch.where(gt_valid[:, :, None], gt_boxes.float(), 0.0)  # padding: IoU 0
            low_img = low // r
            for i in low_img.unique().tolist():
                for part in low[low_img == i].split(max(1, MAX_WINDOW_PAIRS // g)):
                    gt_index[part] = pairwise_iou(gt[i], anchors[part - i * r]).argmax(dim=0)  # (G, P) -> (P,)
        gt_index = torch.where(foreground, gt_index, 0).view(n, r)
        best_iou, foreground = best_iou.view(n, r), foreground.view(n, r)
        labels = torch.full_like(gt_index, IGNORE, dtype=torch.int8)
        labels.masked_fill_(best_iou < self.bg_iou_thresh, BACKGROUND)
        labels.masked_fill_(foreground, FOREGROUND)
        return Matches(gt_index, labels)

    @staticmethod
    def _check_grids(r: int, grids: Sequence[AnchorGrid]) -> None:
        if sum(len(grid) for grid in grids) != r:
            raise ValueError(f"anchor grids hold {sum(len(grid) for grid in grids)} anchors, not {r}")

    @staticmethod
    def _blocks(r: int, grids: Sequence[AnchorGrid] | None, max_anchors: int) -> list[_Block]:
        """The ``r`` anchors in blocks of at most ``max_anchors`` (at least one grid row)."""
        max_anchors = max(1, max_anchors)
        if grids is None:
            return [_Block(slice(j, j + max_anchors)) for j in range(0, r, max_anchors)]
        Matcher._check_grids(r, grids)
        blocks, start = [], 0
        for level, grid in enumerate(grids):
            step = max(1, max_anchors // grid.row_size)  # grid rows per block
            for y in range(0, grid.ys.shape[0], step):
                rows = slice(y, min(y + step, grid.ys.shape[0]))
                size = (rows.stop - rows.start) * grid.row_size
                blocks.append(_Block(slice(start, start + size), level, rows))
                start += size
        return blocks

    @staticmethod
    def _max_iou_elements(device: torch.device, grid: bool) -> int:
        if device.type != "cpu":
            return MAX_IOU_ELEMENTS
        return MAX_GRID_IOU_ELEMENTS_CPU if grid else MAX_IOU_ELEMENTS_CPU

    def __repr__(self) -> str:
        return (
            f"Matcher(fg_iou_thresh={self.fg_iou_thresh}, bg_iou_thresh={self.bg_iou_thresh}, "
            f"allow_low_quality_matches={self.allow_low_quality_matches})"
        )
