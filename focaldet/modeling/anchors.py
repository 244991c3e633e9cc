"""Dense anchors on P3-P7 (RetinaNet, Sec. 4 of the paper).

Each pyramid level ``l`` (stride ``2**l``) gets anchors of area ``(4 * stride)**2`` at three
scales ``{2**0, 2**(1/3), 2**(2/3)}`` and three aspect ratios ``h/w in {1:2, 1:1, 2:1}``:
9 anchors per location, covering 32-813 px. Anchors are laid out location-major then
anchor-minor, ``(Hi, Wi, A)``, with ``A`` ordered ratio-major, scale-minor -- the order the
head's ``(N, A*K, Hi, Wi)`` output is flattened in (and torchvision's).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

DEFAULT_SIZES = (32, 64, 128, 256, 512)
DEFAULT_STRIDES = (8, 16, 32, 64, 128)
DEFAULT_SCALES = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
DEFAULT_RATIOS = (0.5, 1.0, 2.0)


@dataclass(frozen=True)
class AnchorGrid:
    """The anchors of one level as a grid: anchor ``(y, x, a)``, row ``(y * W + x) * A + a``
    of the level's ``(H*W*A, 4)`` anchors, is ``cell[a] + (xs[x], ys[y], xs[x], ys[y])``.

    Its x-extents depend on ``(x, a)`` only and its y-extents on ``(y, a)`` only, which lets
    the matcher compute the IoU with ``H + W`` overlaps per box instead of ``H * W``.
    """

    xs: Tensor  # (W,) centre x of each column, input pixels
    ys: Tensor  # (H,) centre y of each row
    cell: Tensor  # (A, 4) xyxy anchors centred at the origin

    @property
    def row_size(self) -> int:
        """Anchors per grid row, ``W * A``."""
        return self.xs.shape[0] * self.cell.shape[0]

    def __len__(self) -> int:
        return self.ys.shape[0] * self.row_size

    def anchors(self) -> Tensor:
        """``(H*W*A, 4)`` xyxy, location-major then anchor-minor."""
        y, x = torch.meshgrid(self.ys, self.xs, indexing="ij")
        shifts = torch.stack([x, y, x, y], dim=-1).reshape(-1, 1, 4)  # (H*W, 1, 4)
        return (shifts + self.cell[None]).reshape(-1, 4)  # (H*W, A, 4) -> (H*W*A, 4)

    def window(self, lo: Tensor, hi: Tensor, axis: int) -> tuple[Tensor, Tensor]:
        """The columns (``axis=0``) or rows (``axis=1``) whose centre lies in ``[lo, hi]``:
        ``(first, count)``, both int64 of ``lo``'s shape (count 0 where none does)."""
        centres = (self.xs if axis == 0 else self.ys).to(lo.dtype)
        first = torch.searchsorted(centres, lo.contiguous())
        stop = torch.searchsorted(centres, hi.contiguous(), right=True)
        return first, (stop - first).clamp_(min=0)

    def nearest(self, c: Tensor, axis: int) -> Tensor:
        """The column (``axis=0``) or row (``axis=1``) whose centre is nearest ``c`` (int64)."""
        centres = (self.xs if axis == 0 else self.ys).to(c.dtype)
        right = torch.searchsorted(centres, c.contiguous()).clamp_(max=centres.shape[0] - 1)
        left = (right - 1).clamp_(min=0)
        return torch.where((centres[right] - c).abs() < (c - centres[left]).abs(), right, left)


class AnchorGenerator(nn.Module):
    """Anchors for every level of a feature pyramid, cached per (feature shapes, device).

    Args:
        sizes: base anchor side per level (P3..P7).
        strides: feature stride per level, in input pixels.
        scales: multipliers of the base size (octave scales).
        aspect_ratios: ``h / w`` of the anchors.
        offset: anchor centres at ``(i + offset) * stride``; 0.0 as detectron2 and torchvision.
        torchvision_compat: reproduce torchvision's integer-rounded sizes (32, 40, 50, ...),
            rounded cell anchors and its strides ``padded_size // feature_size`` (which
            differ from 64 and 128 on P6/P7 when the padded size is not a multiple of 128),
            for exact parity with ``retinanet_resnet50_fpn``.
    """

    def __init__(
        self,
        sizes: Sequence[float] = DEFAULT_SIZES,
        strides: Sequence[int] = DEFAULT_STRIDES,
        scales: Sequence[float] = DEFAULT_SCALES,
        aspect_ratios: Sequence[float] = DEFAULT_RATIOS,
        offset: float = 0.0,
        torchvision_compat: bool = False,
    ) -> None:
        super().__init__()
        if len(sizes) != len(strides):
            raise ValueError(f"anchor sizes {list(sizes)} and strides {list(strides)} differ in length")
        self.sizes = tuple(float(s) for s in sizes)
        self.strides = tuple(int(s) for s in strides)
        self.scales, self.aspect_ratios = tuple(scales), tuple(aspect_ratios)
        self.offset = float(offset)
        self.torchvision_compat = torchvision_compat
        self.num_anchors = len(scales) * len(aspect_ratios)
        cells = [self._cell_anchors(size, scales, aspect_ratios, torchvision_compat) for size in sizes]
        # (L, A, 4): not a buffer, anchors are derived state and never saved in checkpoints.
        self._cells = torch.stack(cells)
        self._cache: dict[tuple, tuple[Tensor, list[AnchorGrid]]] = {}

    @staticmethod
    def _cell_anchors(size: float, scales, ratios, torchvision_compat: bool) -> Tensor:
        """``(A, 4)`` anchors centred at the origin, ratio-major then scale-minor."""
        if torchvision_compat:  # torchvision: sizes = (x, int(x * 2**(1/3)), int(x * 2**(2/3)))
            side = torch.tensor([float(int(size * s)) for s in scales])
        else:
            side = torch.tensor([size * s for s in scales], dtype=torch.float64)
        h_ratios = torch.sqrt(torch.tensor(ratios, dtype=side.dtype))
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * side[None, :]).reshape(-1)  # (R*S,)
        hs = (h_ratios[:, None] * side[None, :]).reshape(-1)
        cell = torch.stack([-ws, -hs, ws, hs], dim=1) / 2
        if torchvision_compat:
            cell = cell.round()
        return cell.float()

    def feature_shapes(self, height: int, width: int) -> list[tuple[int, int]]:
        """``(Hi, Wi)`` of each level for an input of ``height x width`` (ceil division)."""
        return [(math.ceil(height / s), math.ceil(width / s)) for s in self.strides]

    def forward(self, feature_shapes: Sequence[Sequence[int]], device: torch.device | str = "cpu",
                image_size: Sequence[int] | None = None) -> Tensor:
        """Anchors of all levels, concatenated: ``(R, 4)`` xyxy in input pixels, where
        ``R = sum_i Hi*Wi*A``; level ``i`` occupies ``num_per_level(feature_shapes)[i]`` rows.
        ``image_size`` (padded ``(H, W)``) is used only in ``torchvision_compat`` mode.

        Cached: a detector sees the same few padded shapes over and over.
        """
        return self.anchors_and_grids(feature_shapes, device, image_size)[0]

    def grids(self, feature_shapes: Sequence[Sequence[int]], device: torch.device | str = "cpu",
              image_size: Sequence[int] | None = None) -> list[AnchorGrid]:
        """The same anchors as ``forward``, one `AnchorGrid` per level (cached alike)."""
        return self.anchors_and_grids(feature_shapes, device, image_size)[1]

    def anchors_and_grids(self, feature_shapes: Sequence[Sequence[int]], device: torch.device | str = "cpu",
                          image_size: Sequence[int] | None = None) -> tuple[Tensor, list[AnchorGrid]]:
        """``(forward(...), grids(...))`` from one cache lookup, for a model that needs both."""
        shapes = tuple(tuple(int(v) for v in s) for s in feature_shapes)
        if self.torchvision_compat and image_size is not None:
            strides = [(int(image_size[0]) // h, int(image_size[1]) // w) for h, w in shapes]
        else:
            strides = [(s, s) for s in self.strides]
        key = (shapes, tuple(strides), str(torch.device(device)))
        cached = self._cache.get(key)
        if cached is None:
            if len(self._cache) >= 64:  # multi-scale training sees a bounded set of shapes
                self._cache.clear()
            grids = [self._grid(c, st, hw, device) for c, st, hw in zip(self._cells, strides, shapes)]
            cached = self._cache[key] = (torch.cat([g.anchors() for g in grids]), grids)
        return cached

    def num_per_level(self, feature_shapes: Sequence[Sequence[int]]) -> list[int]:
        """Number of anchors of each level, ``Hi * Wi * A``."""
        return [int(h) * int(w) * self.num_anchors for h, w in feature_shapes]

    def _grid(self, cell: Tensor, stride: tuple[int, int], shape: tuple[int, int], device) -> AnchorGrid:
        (sy, sx), (h, w) = stride, shape
        ys = (torch.arange(h, dtype=torch.float32) + self.offset) * sy
        xs = (torch.arange(w, dtype=torch.float32) + self.offset) * sx
        return AnchorGrid(xs.to(device), ys.to(device), cell.to(device))

    def extra_repr(self) -> str:
        return f"strides={self.strides}, num_anchors={self.num_anchors}, offset={self.offset}"


# ------------------------------------------------------------------ best anchor of each box
def centred_on_nearest_anchor(boxes: Tensor, padded_size: Sequence[int], generator: AnchorGenerator) -> Tensor:
    """``(G, L, 4)``: each box ``(G, 4)`` xyxy translated so that the anchor centre nearest its
    centre on level ``l`` (of the grid ``generator`` makes for an input of ``padded_size``) is
    the origin.

    Why the nearest centre: for one anchor shape, the overlap of a box and an anchor along x
    depends only on their centres' x distance (and shrinks as it grows), the same along y, so
    the best anchor of each shape on a level is the one centred on the grid point nearest the
    box's centre. The IoU with the level's cell anchors (`cell_anchors`, centred at the
    origin) is then the IoU with the best anchor of each shape."""
    ph, pw = (int(v) for v in padded_size)
    grids = generator.grids(generator.feature_shapes(ph, pw), "cpu", image_size=(ph, pw))
    boxes = boxes.float()
    cx = (boxes[:, 0] + boxes[:, 2]) / 2  # (G,)
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    out = torch.empty(len(boxes), len(grids), 4, dtype=torch.float32)
    for level, grid in enumerate(grids):
        x0 = grid.xs[grid.nearest(cx, axis=0)]  # (G,) nearest column centre
        y0 = grid.ys[grid.nearest(cy, axis=1)]
        out[:, level] = boxes - torch.stack([x0, y0, x0, y0], dim=1)
    return out


def cell_anchors(generator: AnchorGenerator) -> Tensor:
    """``(L, A, 4)`` the generator's cell anchors (its own rounding), centred at the origin."""
    return torch.stack([g.cell for g in generator.grids(generator.feature_shapes(1, 1), "cpu")])


def best_anchor_iou(boxes: Tensor, padded_size: Sequence[int], generator: AnchorGenerator,
                    chunk_size: int = 1 << 14) -> Tensor:
    """``(G,)``: the best IoU of each box ``(G, 4)`` xyxy with any anchor ``generator`` makes for
    an input of ``padded_size`` -- ``box_iou(boxes, anchors).max(1)`` over all anchors, from one
    candidate per level and shape (`centred_on_nearest_anchor`). The one home of the best-anchor
    IoU: ``focaldet data check``'s anchor coverage and `focaldet.analysis.anchors` use it."""
    from torchvision.ops import box_iou

    if len(boxes) == 0:
        return boxes.new_zeros((0,))
    cells = cell_anchors(generator)  # (L, A, 4)
    best = []
    for i in range(0, len(boxes), chunk_size):  # bounded memory: (chunk, A) IoUs per level
        rel = centred_on_nearest_anchor(boxes[i : i + chunk_size], padded_size, generator)  # (g, L, 4)
        per_level = [box_iou(rel[:, level], cells[level]).amax(1) for level in range(cells.shape[0])]
        best.append(torch.stack(per_level, 1).amax(1))  # (g, L) -> (g,)
    return torch.cat(best)
