"""``focaldet bench``: the harness runs every case and writes the JSON it promises.

No timing is asserted (the numbers depend on the machine); see docs/benchmarks.md.
"""

import json
from pathlib import Path

import pytest
import torch

from focaldet import bench
from focaldet.bench import coco_eval, harness, models


def test_format_table_and_ratio_direction():
    table = bench.format_table({"loss": {"focaldet": 0.5, "torchvision": 2.0, "ratio": 4.0},
                                "memory": {"focaldet": 2**20, "torchvision": 2**21, "ratio": 2.0}})
    assert "loss" in table and "4.00x" in table and "1.0" in table


def test_unknown_case_is_an_error(capsys):
    assert bench.main(["--cases", "nope"]) == 2
    assert "unknown case" in capsys.readouterr().err


def test_freeze_batchnorm_keeps_the_function():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
        net[1].weight.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    ref = net.eval()(x)
    models.freeze_batchnorm(net)
    assert type(net[1]).__name__ == "FrozenBatchNorm2d"
    torch.testing.assert_close(net.train()(x), ref, rtol=1e-5, atol=1e-5)


def test_synthetic_eval_data_is_valid_coco():
    dataset, results = coco_eval.synthetic_coco_eval_data(5, 7, seed=0, num_classes=3)
    assert len(dataset["images"]) == 5 and len(results) == 35
    assert {r["category_id"] for r in results} <= {c["id"] for c in dataset["categories"]}


QUICK_CASES = [c for c in bench.CASES if not c.startswith("export")]  # a minute or more to write ResNet-50's ONNX file


def run_quick_bench(out: Path, synth, done: dict) -> dict:
    """``focaldet bench --quick`` of every case but the exports, writing a JSON and a plot into
    ``out``: a background job (tests/background.py), its numbers read by the test below."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*degenerate box")  # BCCD has one, in the data case
        status = bench.main(["--quick", "--quiet", "--device", "cpu", "--cases", ",".join(QUICK_CASES),
                             "--json", str(out / "bench.json"), "--plot", str(out / "ratios.png")])
    return {"status": status, "json": str(out / "bench.json"), "plot": str(out / "ratios.png")}


@pytest.mark.slow
def test_quick_run_writes_json_with_every_case(bench_quick):
    assert bench_quick["status"] == 0
    assert Path(bench_quick["plot"]).read_bytes().startswith(b"\x89PNG")
    results = json.loads(Path(bench_quick["json"]).read_text())
    cases = QUICK_CASES
    assert list(results) == cases
    for case, r in results.items():
        assert {"focaldet", "torchvision", "ratio"} <= set(r), case  # loss_scaling adds its own keys
        assert all(isinstance(r[k], (int, float)) and r[k] > 0 for k in ("focaldet", "torchvision", "ratio")), (case, r)
        for sub in (v for v in r.values() if isinstance(v, dict)):  # loss_scaling's loss_g{G}
            assert sub["ratio"] == pytest.approx(sub["torchvision"] / sub["focaldet"]), (case, sub)
        assert r["ratio"] == pytest.approx(
            r["focaldet"] / r["torchvision"] if case == "data" else r["torchvision"] / r["focaldet"])


def test_training_steps_do_the_same_flops():
    """Same architecture on both sides: the counted FLOPs of a training step are equal."""
    settings = bench.Settings.quick(verbose=False)
    tv, fd = models.build_pair(settings, 128, frozen_bn=True)
    criterion = models.build_criterion(fd, settings)
    images = models.padded_batch(1, 128, torch.Generator().manual_seed(0), settings)
    sizes = torch.tensor([[128, 128]])
    boxes, labels = models.random_targets(1, 4, 128, settings.num_classes, seed=0, device="cpu")
    fd_run, tv_run = models.focaldet_train_step(fd, criterion, settings), models.torchvision_train_step(tv, settings)
    flops = harness.step_flops(lambda: fd_run(images, sizes, boxes, labels))
    assert flops == harness.step_flops(lambda: tv_run(images.contiguous(), sizes, boxes, labels)) > 1e10


def test_flops_note_gives_the_share_of_the_gpu_peak(monkeypatch):
    settings = bench.Settings(amp="bf16")
    note = harness.flops_note({"focaldet": 2e12, "torchvision": 2e12}, {"focaldet": 0.01, "torchvision": 0.02}, settings)
    assert note == "2000.0 GFLOP/step on both sides; 200 / 100 TFLOP/s"  # CPU: no peak to compare with
    monkeypatch.setattr(harness, "_gpu_peak_tflops", lambda s: 1000.0)
    note = harness.flops_note({"focaldet": 2e12, "torchvision": 3e12}, {"focaldet": 0.01, "torchvision": 0.02}, settings)
    assert note == ("2000.0 GFLOP/step (torchvision 3000.0); 200 / 150 TFLOP/s = 20.0 % / 15.0 % "
                    "of the bf16 peak (1000)")


def test_plot_marks_each_case_against_its_target(tmp_path):
    results = {"loss": {"ratio": 6.0}, "data": {"ratio": 0.33}}
    path = bench.plot_ratios(results, tmp_path / "sub" / "ratios.png", device="cuda")
    assert path.read_bytes().startswith(b"\x89PNG")
    assert bench.GPU_TARGETS["train_step"] == 1.3 and bench.TARGETS["train_step"] == 1.0


# ----------------------------------------------------------------------------- the optimised hot paths
# (see docs/benchmarks.md): each keeps the result of the straightforward version.

@pytest.mark.parametrize("grids", [False, True])  # flat anchors, and focaldet's anchor grids
@pytest.mark.parametrize("block", [None, 1000])  # the default blocks, and many small ones
def test_matcher_equals_torchvision_matcher(block, grids, monkeypatch):
    from torchvision.models.detection._utils import Matcher as TorchvisionMatcher
    from torchvision.ops import box_iou

    from focaldet.modeling import AnchorGenerator, Matcher, matcher
    from focaldet.modeling.matcher import BACKGROUND, FOREGROUND, IGNORE

    if block is not None:
        monkeypatch.setattr(matcher, "MAX_IOU_ELEMENTS_CPU", block)
        monkeypatch.setattr(matcher, "MAX_GRID_IOU_ELEMENTS_CPU", block)

    gen = AnchorGenerator(torchvision_compat=True)
    shapes = gen.feature_shapes(256, 256)
    anchors = gen(shapes, "cpu", image_size=(256, 256))
    boxes, labels = models.random_targets(3, 12, 256, 5, seed=0, device="cpu")
    labels[0, 6:] = -1  # padding
    valid = labels >= 0
    ours = Matcher()(anchors, boxes, valid, grids=gen.grids(shapes, "cpu", image_size=(256, 256)) if grids else None)
    ref_matcher = TorchvisionMatcher(0.5, 0.4, allow_low_quality_matches=True)
    for i in range(3):
        ref = ref_matcher(box_iou(boxes[i][valid[i]], anchors))
        assert torch.equal(ours.labels[i] == FOREGROUND, ref >= 0)
        assert torch.equal(ours.labels[i] == BACKGROUND, ref == -1)
        assert torch.equal(ours.labels[i] == IGNORE, ref == -2)
        assert torch.equal(ours.gt_index[i][ref >= 0], ref[ref >= 0])


def test_pairwise_iou_equals_box_iou():
    from torchvision.ops import box_iou

    from focaldet.modeling.matcher import pairwise_iou
    boxes, _ = models.random_targets(3, 12, 256, 5, seed=1, device="cpu")  # (3, 12, 4)
    anchors, _ = models.random_targets(1, 500, 256, 5, seed=2, device="cpu")
    got = pairwise_iou(boxes, anchors[0])  # (3, 12, 500)
    for i in range(3):
        assert torch.equal(got[i], box_iou(boxes[i], anchors[0]))


@pytest.mark.parametrize("compat,offset,size", [(True, 0.0, (256, 384)), (False, 0.5, (200, 330))])
def test_grid_iou_equals_pairwise_iou(compat, offset, size):
    from focaldet.modeling import AnchorGenerator
    from focaldet.modeling.matcher import grid_iou, pairwise_iou

    gen = AnchorGenerator(offset=offset, torchvision_compat=compat)
    shapes = gen.feature_shapes(*size)
    anchors = gen(shapes, image_size=size).split(gen.num_per_level(shapes))
    boxes, _ = models.random_targets(2, 7, max(size), 5, seed=3, device="cpu")  # (2, 7, 4)
    for grid, level in zip(gen.grids(shapes, image_size=size), anchors):
        assert torch.equal(grid.anchors(), level)
        h = grid.ys.shape[0]
        for rows in (slice(0, h), slice(h // 3, h // 3 + 2)):  # the whole level, and a band of rows
            flat = level[rows.start * grid.row_size:min(rows.stop, h) * grid.row_size]
            assert torch.equal(grid_iou(boxes, grid, rows), pairwise_iou(boxes, flat))


def test_grouped_nms_equals_batched_nms():
    from torchvision.ops import batched_nms

    from focaldet.modeling.postprocess import grouped_nms

    g = torch.Generator().manual_seed(0)
    for n in (0, 1, 500, 3000):  # 3000 x 4 > 4000: torchvision's per-group loop
        xy = torch.rand(n, 2, generator=g) * 300
        boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 80 + 1], 1)
        scores = torch.rand(n, generator=g).round(decimals=2)  # many ties
        groups = torch.randint(0, 37, (n,), generator=g)
        ours, ref = grouped_nms(boxes, scores, groups, 0.5), batched_nms(boxes, scores, groups, 0.5)
        assert sorted(ours.tolist()) == sorted(ref.tolist())
        assert torch.equal(scores[ours], scores[ref])


def test_topk_over_best_anchors_equals_full_topk():
    from focaldet.modeling import PostProcess

    scores = torch.rand(3, 700, 6, generator=torch.Generator().manual_seed(0))
    top, anchor, cls = PostProcess(topk_candidates=100)._topk(scores)
    ref = scores.reshape(3, -1).topk(100, dim=1).values
    torch.testing.assert_close(top.sort(dim=1, descending=True).values, ref)
    torch.testing.assert_close(scores[torch.arange(3)[:, None], anchor, cls], top)


def test_focal_loss_backward_twice_through_a_retained_graph():
    from focaldet.losses import SigmoidFocalLoss

    x = torch.randn(300, 5, requires_grad=True)
    labels, weight = torch.randint(0, 6, (300,)), torch.ones(300)
    loss = SigmoidFocalLoss()(x, labels, weight)
    (g1,) = torch.autograd.grad(loss * 3, x, retain_graph=True)  # uses the forward's gradient
    (g2,) = torch.autograd.grad(loss * 3, x)  # recomputes it
    torch.testing.assert_close(g1, g2)


def compile_focal_loss(out: Path, synth, done: dict) -> dict:
    """`SigmoidFocalLoss` eager and ``compile=True`` (torch.compile's first compile takes
    seconds) on two shapes, losses and gradients saved to ``out/focal.pt``: a background job
    (tests/background.py), compared by the test below."""
    from focaldet.losses import SigmoidFocalLoss

    g = torch.Generator().manual_seed(1)
    results = []
    for shape in ((2, 50, 4), (3, 70, 4)):  # a second shape: dynamic, no recompile error
        logits = (torch.randn(*shape, generator=g) * 3).requires_grad_()
        labels = torch.randint(0, 5, shape[:2], generator=g)
        weight = (torch.rand(shape[:2], generator=g) > 0.2).float()
        eager = SigmoidFocalLoss()(logits, labels, weight)
        (ge,) = torch.autograd.grad(eager, logits)
        compiled = SigmoidFocalLoss(compile=True)(logits, labels, weight)
        (gc,) = torch.autograd.grad(compiled, logits)
        results.append({"eager": eager.detach(), "eager_grad": ge, "compiled": compiled.detach(), "compiled_grad": gc})
    torch.save(results, out / "focal.pt")
    return {"path": str(out / "focal.pt")}


@pytest.mark.slow
def test_compiled_focal_loss_equals_eager(compiled_focal_loss):
    for r in torch.load(compiled_focal_loss["path"], weights_only=True):
        torch.testing.assert_close(r["compiled"], r["eager"], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(r["compiled_grad"], r["eager_grad"], rtol=1e-5, atol=1e-6)
