"""Every CUDA path of focaldet, against torchvision and against the CPU results.

The tests marked ``gpu`` need CUDA (they are skipped without it); ``scripts/gpu_check.sh``
runs them on the GPU machine. ``FOCALDET_GPU_TESTS_DEVICE=cpu`` runs the same tests on CPU
(``scripts/gpu_check.sh --cpu``), which checks their logic but compares CPU with CPU.
The unmarked tests run the branches that ``device.type != "cpu"`` selects (whole-batch
matcher, one-chunk focal kernel, fp64 ``batched_nms``) on CPU, against the CPU branches.
"""

from __future__ import annotations

from functools import partial

import json
import os
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models.detection import retinanet_resnet50_fpn

from focaldet.losses import focal
from focaldet.losses.focal import SigmoidFocalLoss
from focaldet.modeling import matcher as matcher_mod
from focaldet.modeling.anchors import AnchorGenerator
from focaldet.modeling.matcher import Matcher
from focaldet.modeling.postprocess import grouped_nms
from focaldet.models import ResNetBackbone, RetinaNet

from helpers import ckpt_dir, tiny_config

gpu = pytest.mark.gpu
pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture
def device() -> torch.device:
    """CUDA, or what FOCALDET_GPU_TESTS_DEVICE names (the dry run)."""
    return torch.device(os.environ.get("FOCALDET_GPU_TESTS_DEVICE") or "cuda")


@pytest.fixture
def exact_fp32():
    """No TF32 in convolutions and matmuls (the CUDA defaults allow it in cuDNN): parity to fp32 rounding."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# ------------------------------------------------------------------ inputs
def _match_inputs(n=4, g=7, size=(256, 320), seed=0):
    """Anchors (flat and as grids) of a ``size`` image and ``n`` images of up to ``g`` boxes (padded)."""
    gen = AnchorGenerator()
    shapes = gen.feature_shapes(*size)
    rng = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, g, 2, generator=rng) * torch.tensor([size[1], size[0]]) * 0.8
    wh = 4 + torch.rand(n, g, 2, generator=rng) * 150
    boxes = torch.cat([xy, xy + wh], dim=-1)
    valid = torch.rand(n, g, generator=rng) < 0.8
    valid[0] = True
    return gen(shapes), gen.grids(shapes), boxes, valid


def _focal_inputs(m=20000, k=80, seed=0):
    rng = torch.Generator().manual_seed(seed)
    logits = torch.randn(m, k, generator=rng) * 3 - 2
    labels = torch.randint(0, k + 1, (m,), generator=rng)  # k = background
    labels[torch.rand(m, generator=rng) < 0.9] = k
    weight = (torch.rand(m, generator=rng) > 0.05).float()
    return logits, labels, weight


def _focal(logits, labels, weight):
    x = logits.clone().requires_grad_()
    loss = SigmoidFocalLoss()(x, labels, weight)
    loss.backward()
    return loss.detach(), x.grad


def _nms_inputs(n=3000, groups=200, seed=0):
    rng = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=rng) * 500
    boxes = torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=rng) * 80], dim=1)
    return boxes, torch.rand(n, generator=rng), torch.randint(0, groups, (n,), generator=rng)


# ------------------------------------------------------------------ the GPU branches, run on CPU
@pytest.mark.parametrize("with_grids", [False, True])
def test_whole_batch_matcher_branch_equals_the_blocked_cpu_branch(monkeypatch, with_grids):
    anchors, grids, boxes, valid = _match_inputs()
    matcher = Matcher()
    cpu = matcher(anchors, boxes, valid, grids=grids if with_grids else None)
    monkeypatch.setattr(Matcher, "_max_iou_elements", staticmethod(lambda device, grid: matcher_mod.MAX_IOU_ELEMENTS))
    whole = matcher(anchors, boxes, valid, grids=grids if with_grids else None)
    assert torch.equal(whole.labels, cpu.labels)
    assert torch.equal(whole.gt_index[whole.labels == 1], cpu.gt_index[cpu.labels == 1])


def test_one_chunk_focal_branch_equals_the_chunked_cpu_branch(monkeypatch):
    logits, labels, weight = _focal_inputs()
    loss, grad = _focal(logits, labels, weight)
    monkeypatch.setattr(focal, "_row_step", lambda x: max(x.shape[0], 1))
    loss1, grad1 = _focal(logits, labels, weight)
    torch.testing.assert_close(loss1, loss, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(grad1, grad, rtol=1e-5, atol=1e-7)


def test_fp64_batched_nms_branch_equals_the_cpu_grouped_nms():
    boxes, scores, groups = _nms_inputs()
    cpu = grouped_nms(boxes, scores, groups, 0.5)
    gpu_branch = torchvision.ops.batched_nms(boxes.double(), scores.double(), groups, 0.5)
    assert torch.equal(cpu, gpu_branch)


# ------------------------------------------------------------------ CUDA against CPU
@gpu
@pytest.mark.parametrize("with_grids", [False, True])
def test_matcher_on_cuda_equals_cpu(device, with_grids):
    anchors, grids, boxes, valid = _match_inputs(n=8)
    matcher = Matcher()
    cpu = matcher(anchors, boxes, valid, grids=grids if with_grids else None)
    dev_grids = AnchorGenerator().grids(AnchorGenerator().feature_shapes(256, 320), device=device)
    got = matcher(anchors.to(device), boxes.to(device), valid.to(device), grids=dev_grids if with_grids else None)
    assert torch.equal(got.labels.cpu(), cpu.labels)
    fg = cpu.labels == 1
    assert torch.equal(got.gt_index.cpu()[fg], cpu.gt_index[fg])


@gpu
def test_focal_kernel_on_cuda_equals_cpu_and_torchvision(device):
    logits, labels, weight = _focal_inputs(m=100000)
    loss, grad = _focal(logits, labels, weight)
    loss_d, grad_d = _focal(logits.to(device), labels.to(device), weight.to(device))
    torch.testing.assert_close(loss_d.cpu(), loss, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(grad_d.cpu(), grad, rtol=1e-4, atol=1e-6)
    # the paper's loss as torchvision writes it, on the same device
    k = logits.shape[1]
    onehot = torch.nn.functional.one_hot(labels, k + 1)[:, :k].float().to(device)
    ref = (torchvision.ops.sigmoid_focal_loss(logits.to(device), onehot, reduction="none").sum(1)
           * weight.to(device)).sum()
    torch.testing.assert_close(loss_d, ref, rtol=1e-5, atol=1e-3)


@gpu
def test_grouped_nms_on_cuda_equals_cpu(device):
    boxes, scores, groups = _nms_inputs()
    cpu = grouped_nms(boxes, scores, groups, 0.5)
    got = grouped_nms(boxes.to(device), scores.to(device), groups.to(device), 0.5)
    assert torch.equal(got.cpu(), cpu)


def _tiny_model(**kw):
    return RetinaNet(3, backbone=ResNetBackbone(18, norm="bn", freeze_at=0), fpn_channels=32, num_convs=1,
                     head_norm=None, **kw)


@gpu
def test_postprocess_on_cuda_equals_cpu(device, exact_fp32):
    torch.manual_seed(0)
    model = _tiny_model().eval()
    with torch.no_grad():
        model.head.cls_logits.bias.fill_(-1.0)  # hundreds of candidates per image
        x = torch.randn(2, 3, 256, 320)
        out = model(x)
        sizes = torch.tensor([[256, 320], [200, 300]])
        cpu = model.detect(out, sizes)
        # the same raw outputs on the device: only the postprocess differs
        out_d = {"cls_logits": [t.to(device) for t in out["cls_logits"]],
                 "box_deltas": [t.to(device) for t in out["box_deltas"]], "anchors": out["anchors"].to(device)}
        got = model.detect(out_d, sizes.to(device))
    for c, g in zip(cpu, got):
        assert len(c["boxes"]) > 50
        _assert_same_detections({k: v.cpu() for k, v in g.items()}, c)


@gpu
def test_torchvision_parity_on_cuda(device, exact_fp32):
    """The CPU parity test of tests/test_retinanet.py, with both models on the device."""
    torch.manual_seed(0)
    tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5, min_size=224, max_size=360).eval()
    with torch.no_grad():
        tv.head.classification_head.cls_logits.bias.fill_(-1.5)
    ours = RetinaNet.from_torchvision(tv, channels_last=False).to(device).eval()
    tv.to(device)
    torch.manual_seed(1)
    images = [torch.rand(3, 200, 300, device=device), torch.rand(3, 170, 211, device=device),
              torch.rand(3, 240, 180, device=device)]
    with torch.no_grad():
        ref, got = tv(images), ours.predict(images)
    for r, g in zip(ref, got):
        assert len(r["boxes"]) >= 200
        _assert_same_detections(g, r)


def _assert_same_detections(got: dict, ref: dict) -> None:
    """The same detections up to the order of near-equal scores (summation order differs
    between kernels and thread counts, and swaps such ties): the same count and scores, and
    each box has a same-label box within 1e-2 px on the other side (clipped boxes may be empty)."""
    assert len(got["boxes"]) == len(ref["boxes"])
    torch.testing.assert_close(got["scores"].sort().values, ref["scores"].sort().values, atol=1e-4, rtol=0)
    # (P, 1, 4) - (1, Q, 4) -> (P, Q): the largest coordinate difference
    dist = (got["boxes"][:, None].double() - ref["boxes"][None].double()).abs().amax(dim=-1)
    dist[got["labels"][:, None] != ref["labels"][None, :]] = float("inf")
    assert dist.amin(dim=1).max() < 1e-2 and dist.amin(dim=0).max() < 1e-2


# ------------------------------------------------------------------ training steps in mixed precision
def _batch(synth_coco, device):
    from focaldet.data.datamodule import CocoDataModule

    dm = CocoDataModule(train_ann=str(synth_coco.train_ann), train_images=str(synth_coco.images),
                        batch_size=4, num_workers=0, min_size=128, max_size=128, hflip_prob=0.0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}, dm.num_classes


@gpu
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_training_step(device, synth_coco, amp):
    """One forward/backward/step under autocast (fp16 with a GradScaler): finite losses and
    gradients, and a loss within 5% of the fp32 one on the same batch and weights."""
    from focaldet.engine.module import RetinaNetModule

    batch, num_classes = _batch(synth_coco, device)
    torch.manual_seed(0)
    model = partial(RetinaNet, backbone=ResNetBackbone(18, norm="frozen_bn", freeze_at=0), fpn_channels=32, num_convs=1)
    module = RetinaNetModule(num_classes, model=model).to(device)
    with torch.no_grad():
        fp32 = module._losses(batch)["loss"]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    opt = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)
    with torch.autocast(device.type, dtype=dtype):
        losses = module._losses(batch)
    assert all(torch.isfinite(v).all() for v in losses.values()), losses
    assert losses["loss"].dtype == torch.float32  # the loss is summed in fp32 under autocast
    torch.testing.assert_close(losses["loss"], fp32, rtol=0.05, atol=0)
    scaler.scale(losses["loss"]).backward()
    scaler.unscale_(opt)
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert len(grads) > 10 and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    before = module.model.head.cls_logits.weight.detach().clone()
    scaler.step(opt)
    scaler.update()
    assert not torch.equal(module.model.head.cls_logits.weight, before)  # the step was taken (not skipped)
    assert all(torch.isfinite(p).all() for p in module.parameters())


# ------------------------------------------------------------------ commands on the device
def _accelerator(device) -> str:
    return "gpu" if device.type == "cuda" else device.type


@gpu
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_fit_on_the_device(tmp_path, synth_coco, device, precision):
    from focaldet.cli import run

    cfg = tiny_config(tmp_path, synth_coco, **{"trainer.accelerator": _accelerator(device),
                                               "trainer.precision": precision})
    assert run(["fit", "-c", str(cfg)]) == 0
    ckpt = torch.load(ckpt_dir(tmp_path / "run") / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


@gpu
def test_predict_on_the_device(tmp_path, synth_coco, device):
    from focaldet.cli import run

    cfg = tiny_config(tmp_path, synth_coco, **{"trainer.accelerator": _accelerator(device)})
    low = tmp_path / "low.yaml"
    low.write_text("model:\n  model:\n    prior_prob: 0.2\n    postprocess:\n      class_path: focaldet.models.PostProcess\n"
                   "      init_args: {score_thresh: 0.0, detections_per_img: 5}\n")
    assert run(["predict", "-c", str(cfg), "-c", str(low), "--data.predict_images", str(synth_coco.images)]) == 0
    [path] = list((tmp_path / "run").rglob("predictions.json"))
    preds = json.loads(path.read_text())
    files = {p.name for p in Path(synth_coco.images).glob("*.jpg")}
    assert {p["file_name"] for p in preds} == files and len(preds) == 5 * len(files)
    assert all(0 <= p["score"] <= 1 and p["bbox"][2] >= 0 and p["bbox"][3] >= 0 for p in preds)
    assert {p["category_id"] for p in preds} <= {1, 3, 7, 8}


@gpu
def test_bench_on_the_device(tmp_path, device):
    from focaldet.bench import main as bench_main

    out = tmp_path / "bench.json"
    cases = "train_step,loss,postprocess,inference"  # the device's cases; gpu_check.sh runs them all
    assert bench_main(["--device", device.type, "--quick", "--quiet", "--cases", cases, "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results) == set(cases.split(",")) and all(r["ratio"] > 0 for r in results.values())


@gpu
def test_export_on_the_device(device, exact_fp32):
    """The export graph on the device (its exact resize, padded postprocess and category ids)
    gives the CPU graph's detections on the same pixels, and a ``torch.export`` program of it
    made on the device gives the eager graph's."""
    import copy

    from focaldet.export.graph import ExportableDetector

    model = _tiny_model().eval()
    with torch.no_grad():
        model.head.cls_logits.bias.fill_(-1.0)  # hundreds of candidates per image
    category_ids = list(range(1, model.num_classes + 1))
    x = (torch.rand(2, 3, 211, 300, generator=torch.Generator().manual_seed(3)) * 255).round() / 255  # 8-bit pixels
    cpu_graph = ExportableDetector(model, category_ids).eval()
    dev_graph = ExportableDetector(copy.deepcopy(model).to(device), category_ids).eval()
    with torch.no_grad():
        ref = cpu_graph(x)
        got = [t.cpu() for t in dev_graph(x.to(device))]
        program = torch.export.export(dev_graph, (x.to(device),)).module()
        exported = [t.cpu() for t in program(x.to(device))]
    for i in range(len(x)):
        k = int(ref[3][i])
        assert k > 50
        r = {"boxes": ref[0][i, :k], "scores": ref[1][i, :k], "labels": ref[2][i, :k] - 1}
        for outputs in (got, exported):
            n = int(outputs[3][i])
            _assert_same_detections({"boxes": outputs[0][i, :n], "scores": outputs[1][i, :n],
                                     "labels": outputs[2][i, :n] - 1}, r)