"""The culled matcher (anchor grids given): exactly the dense matcher's matches, bit for bit,
on random and adversarial layouts; work bounded by the windows, not boxes x anchors."""

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from focaldet.modeling import AnchorGenerator, Matcher, matcher
from focaldet.modeling.matcher import anchor_windows, pairwise_iou, probe_iou

GENERATORS = {  # (generator, padded image (H, W))
    "default": (AnchorGenerator(), (128, 128)),
    "offset": (AnchorGenerator(offset=0.5), (96, 160)),
    "torchvision": (AnchorGenerator(torchvision_compat=True), (160, 96)),  # P6/P7 strides not 64/128
    "one_level": (AnchorGenerator(sizes=(24,), strides=(8,), scales=(1.0, 1.7), aspect_ratios=(0.3, 1.0, 3.1)),
                  (64, 80)),
}
MATCHERS = [Matcher(), Matcher(allow_low_quality_matches=False), Matcher(0.7, 0.3), Matcher(0.5, 0.5),
            Matcher(0.3, 0.1)]


@pytest.fixture(autouse=True, scope="module")
def _denormals_flushed_as_in_training():
    """The matcher runs as in training, where `RetinaNetModule.setup` flushes denormals: set here,
    not left to whether an earlier test of the process ran a fit (the suite's order changes).
    With denormals kept, a box of min-normal height (1.2e-38) gives a subnormal IoU that the
    culled path does not match as the dense one does (found by this test; issue 22's note)."""
    torch.set_flush_denormal(True)


def _anchors(name):
    gen, size = GENERATORS[name]
    anchors, grids = gen.anchors_and_grids(gen.feature_shapes(*size), "cpu", image_size=size)
    return anchors, grids, size


def assert_culled_equals_dense(m, anchors, grids, boxes, valid):
    culled = m(anchors, boxes, valid, grids=grids)
    dense = m(anchors, boxes, valid)  # flat anchors: the dense path, tested against torchvision's
    assert torch.equal(culled.labels, dense.labels)
    assert torch.equal(culled.gt_index, dense.gt_index)
    return culled


def _boxes(rows):
    return torch.tensor(rows, dtype=torch.float32).view(1, -1, 4)


# ----------------------------------------------------------------------------- random layouts
# no subnormals: an earlier test may have set torch.set_flush_denormal(True) in this process
f32 = functools.partial(st.floats, width=32, allow_subnormal=False)
box = st.tuples(f32(-150, 300), f32(-150, 300),  # x1, y1
                f32(0, 400) | f32(0, 8),  # w: any, or tiny
                f32(0, 400) | f32(0, 8))  # h


@settings(max_examples=60, deadline=None)
@given(layout=st.lists(st.lists(box, min_size=0, max_size=12), min_size=1, max_size=3),
       gen=st.sampled_from(sorted(GENERATORS)), m=st.sampled_from(MATCHERS), seed=st.integers(0, 2**16))
def test_random_layouts(layout, gen, m, seed):
    anchors, grids, _ = _anchors(gen)
    g = max(len(rows) for rows in layout)
    boxes, valid = torch.zeros(len(layout), g, 4), torch.zeros(len(layout), g, dtype=torch.bool)
    rng = torch.Generator().manual_seed(seed)
    for i, rows in enumerate(layout):
        for j, (x, y, w, h) in enumerate(rows):
            boxes[i, j] = torch.tensor([x, y, x + w, y + h])
            valid[i, j] = True
        boxes[i, len(rows):] = torch.randn(g - len(rows), 4, generator=rng) * 100  # garbage padding
    if g and torch.rand(1, generator=rng) < 0.3:  # copies of a box: ties between boxes
        boxes[:, -1], valid[:, -1] = boxes[:, 0], valid[:, 0]
    assert_culled_equals_dense(m, anchors, grids, boxes, valid)


@pytest.mark.parametrize("gen", sorted(GENERATORS))
def test_random_crowds_and_chunks(gen, monkeypatch):
    """Hundreds of boxes of every size, and the windows computed a few pairs at a time."""
    anchors, grids, (h, w) = _anchors(gen)
    rng = torch.Generator().manual_seed(len(gen))
    wh = torch.rand(2, 300, 2, generator=rng) ** 3 * 200 + 0.5  # mostly small, some huge
    xy = torch.rand(2, 300, 2, generator=rng) * torch.tensor([w + 40.0, h + 40.0]) - 20 - wh / 2
    boxes, valid = torch.cat([xy, xy + wh], -1), torch.rand(2, 300, generator=rng) > 0.1
    for m in MATCHERS[:3]:
        ref = assert_culled_equals_dense(m, anchors, grids, boxes, valid)
        monkeypatch.setattr(matcher, "MAX_WINDOW_PAIRS", 97)
        assert_culled_equals_dense(m, anchors, grids, boxes, valid)
        monkeypatch.undo()
    assert (ref.labels == 1).sum() > 300  # the layout does match


# ----------------------------------------------------------------------------- adversarial layouts
def test_boxes_exactly_on_anchors_and_identical_boxes():
    """Boxes equal to anchors (IoU exactly 1, and exact ties with the anchor's neighbours
    of other shapes), the same box many times (the first one wins every anchor)."""
    anchors, grids, _ = _anchors("default")
    rows = anchors[[0, 8, 9 * 17 + 4, 2000, len(anchors) - 1]].tolist()
    boxes = _boxes(rows + [rows[2]] * 40 + [rows[0]])
    culled = assert_culled_equals_dense(Matcher(), anchors, grids, boxes, torch.ones(1, 46, dtype=torch.bool))
    for k, row in enumerate([0, 8, 9 * 17 + 4, 2000, len(anchors) - 1]):
        assert culled.labels[0, row] == 1 and culled.gt_index[0, row] == k


def test_huge_tiny_degenerate_and_off_image_boxes():
    anchors, grids, _ = _anchors("torchvision")
    rows = [
        [-5000, -5000, 5000, 5000], [-400, -400, 600, 600], [0, 0, 96, 160],  # huge, larger than the image
        [40, 40, 40.5, 40.25], [10, 10, 11, 11], [0, 0, 0.01, 0.01],  # tiny
        [30, 30, 30, 60], [50, 50, 50, 50], [60, 60, 55, 70], [70, 70, 60, 60],  # zero-area and inverted
        [900, 900, 950, 950], [-300, 20, -250, 60], [96.5, 170, 130, 200],  # off every anchor / the image
        [-30, -30, 2, 2], [90, 150, 120, 190],  # across the border
    ]
    for m in MATCHERS:
        assert_culled_equals_dense(m, anchors, grids, _boxes(rows), torch.ones(1, len(rows), dtype=torch.bool))
    for k in (0, 3, 4, 5, 13, 14):  # alone, each of them gets its low-quality matches
        culled = assert_culled_equals_dense(Matcher(), anchors, grids, _boxes([rows[k]]), torch.ones(1, 1, dtype=torch.bool))
        assert (culled.labels == 1).any()


def test_only_padding_and_no_boxes():
    anchors, grids, _ = _anchors("offset")
    boxes = torch.full((2, 3, 4), float("nan"))  # padding is never read
    m = Matcher()(anchors, boxes, torch.zeros(2, 3, dtype=torch.bool), grids=grids)
    assert (m.labels == 0).all() and (m.gt_index == 0).all()
    m = Matcher()(anchors, torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool), grids=grids)
    assert (m.labels == 0).all() and m.labels.shape == (2, len(anchors))


def test_low_quality_tie_across_levels_and_boxes():
    """A box whose best IoU (< 0.4) is reached by several anchors, of two levels; a second box
    reaching the same anchors with the same IoU: each of them goes to the first box."""
    gen = AnchorGenerator(sizes=(16, 32), strides=(8, 16), scales=(1.0,), aspect_ratios=(1.0,))
    size = (64, 64)
    anchors, grids = gen.anchors_and_grids(gen.feature_shapes(*size), "cpu")
    # 8x8 box centred between four 16x16 P3 anchors: IoU 16 / 256 with each of them
    boxes = _boxes([[4, 4, 12, 12], [4, 4, 12, 12], [36, 36, 40, 40]])
    culled = assert_culled_equals_dense(Matcher(), anchors, grids, boxes, torch.ones(1, 3, dtype=torch.bool))
    assert (culled.labels[0] == 1).sum() >= 4 and set(culled.gt_index[0][culled.labels[0] == 1].tolist()) == {0, 2}


# ----------------------------------------------------------------------------- the bounds themselves
def test_windows_hold_every_anchor_above_their_threshold():
    """For each box and level, the anchors outside its windows have IoU < the threshold."""
    anchors, grids, (h, w) = _anchors("torchvision")
    rng = torch.Generator().manual_seed(3)
    wh = torch.rand(200, 2, generator=rng) * 250 + 1
    xy = torch.rand(200, 2, generator=rng) * 200 - 50
    boxes = torch.cat([xy, xy + wh], 1)
    thresh = torch.rand(200, generator=rng) * 0.6
    thresh[:20] = 0
    start = 0
    for grid in grids:
        win = anchor_windows(boxes, thresh, grid, start)
        box, row = win.pairs()
        inside = torch.zeros(200, len(anchors), dtype=torch.bool)
        inside[box, row] = True
        iou = pairwise_iou(boxes, anchors)  # (200, R)
        level = torch.zeros(len(anchors), dtype=torch.bool)
        level[start:start + len(grid)] = True
        reach = (iou >= thresh[:, None]) & ((iou > 0) | (thresh[:, None] > 0)) & level
        assert not (reach & ~inside).any()
        assert inside.sum() < 0.25 * level.sum() * 200  # and the windows are small
        start += len(grid)
    best = probe_iou(boxes, anchors, grids)
    assert (best <= pairwise_iou(boxes, anchors).amax(1)).all() and (best > 0).float().mean() > 0.9


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_culled_on_cuda_equals_cpu():
    gen = AnchorGenerator()
    size = (512, 512)
    rng = torch.Generator().manual_seed(0)
    wh = torch.rand(2, 2000, 2, generator=rng) * 60 + 4
    xy = torch.rand(2, 2000, 2, generator=rng) * (512 - wh)
    boxes, valid = torch.cat([xy, xy + wh], -1), torch.rand(2, 2000, generator=rng) > 0.05
    cpu = Matcher()(*gen.anchors_and_grids(gen.feature_shapes(*size), "cpu")[:1], boxes, valid)
    anchors, grids = gen.anchors_and_grids(gen.feature_shapes(*size), "cuda")
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    cuda = Matcher()(anchors, boxes.cuda(), valid.cuda(), grids=grids)
    assert torch.equal(cuda.labels.cpu(), cpu.labels) and torch.equal(cuda.gt_index.cpu(), cpu.gt_index)
    # far below the (N, G, R) IoU's 786 MB
    assert torch.cuda.max_memory_allocated() - before < 200 * 2**20
