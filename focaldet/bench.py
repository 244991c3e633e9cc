"""``focaldet bench``: focaldet against torchvision's RetinaNet, side by side in one run.

Both sides run the same architecture with the same weights and settings (the focaldet
model is built with ``RetinaNet.from_torchvision``), on the same device and the same
inputs. Every timed case warms up both sides, then alternates them (focaldet, torchvision,
torchvision, focaldet, ...) so that drifting machine load hits both alike, synchronises
CUDA around every call, and reports medians. The ratio is always "higher is better for
focaldet": torchvision time / focaldet time, torchvision bytes / focaldet bytes, and for
images/s focaldet / the decode-only limit.

Cases::

    train_step   forward + loss + backward of a batch (both with frozen BatchNorm)
    loss         target assignment + both losses + backward, from given head outputs
    postprocess  decode + top-k + NMS, from given head outputs
    inference    images -> detections, eval mode
    data         training data pipeline images/s against decoding the JPEGs alone
    eval         COCO evaluation: faster-coco-eval (focaldet column) vs pycocotools
    memory       peak memory of one training step (CUDA: max_memory_allocated; CPU: peak
                 RSS growth in a fresh process per side)

Usage: ``focaldet bench [--cases loss,postprocess] [--quick] [--json FILE] [--device cuda]``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["CASES", "Settings", "main", "run_cases"]

CASES = ("train_step", "loss", "postprocess", "inference", "data", "eval", "memory")
# <repo>/../shared/data/bccd, as the tests and configs/bccd.yaml expect it
BCCD_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "bccd"


@dataclass
class Settings:
    """Sizes of every case (``--quick`` shrinks them)."""

    device: str = "cpu"
    amp: str | None = None  # "bf16" | "fp16"
    compile: bool = False  # focaldet's focal loss through torch.compile
    channels_last: bool = True  # focaldet's model in NHWC (its default); --channels-first turns it off
    fuse_bn: bool = True  # inference: focaldet's frozen BN folded into the convolutions; --keep-bn turns it off
    num_classes: int = 80
    # train_step / inference / memory
    size: int = 320
    batch: int = 2
    gt_per_image: int = 10
    # loss / postprocess
    loss_size: int = 512
    loss_batch: int = 8
    loss_gt: int = 50
    # data
    data_dir: Path | None = None
    data_batch: int = 8
    data_images: int = 0  # the first N train images only; 0 = the whole train split
    workers: int = 2
    # eval
    eval_images: int = 2000
    eval_dets: int = 100
    # memory: fresh processes per side (median); the measurement repeats to 0.1 MiB
    memory_runs: int = 1
    # harness
    warmup: int = 1
    repeats: int = 5
    seed: int = 0
    threads: int = 0  # torch.set_num_threads; 0 = torch's default
    verbose: bool = True
    notes: dict[str, str] = field(default_factory=dict)

    @classmethod
    def quick(cls, **kw) -> Settings:
        return cls(size=128, batch=1, gt_per_image=4, loss_size=256, loss_batch=2, loss_gt=10, data_images=16,
                   data_batch=4, eval_images=60, eval_dets=20, warmup=1, repeats=2, **kw)


def _log(settings: Settings, msg: str) -> None:
    if settings.verbose:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- harness
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], device: str) -> float:
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # as timeit does: no collection pauses inside a measurement
    try:
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - start
    finally:
        if gc_was_enabled:
            gc.enable()


def compare(name: str, focaldet_fn: Callable[[], Any], torchvision_fn: Callable[[], Any], settings: Settings,
            before: Callable[[], Any] | None = None) -> dict[str, float]:
    """Median seconds of the two sides: ``warmup`` untimed calls each, then ``repeats``
    timed calls each, alternating ABBA so that load drift and cache state favour neither.
    ``before`` runs untimed ahead of every call (e.g. clearing gradients)."""
    sides = {"focaldet": focaldet_fn, "torchvision": torchvision_fn}
    for i in range(settings.warmup):
        for side, fn in sides.items():
            _log(settings, f"{name}: warm-up {i + 1}/{settings.warmup} {side}")
            if before is not None:
                before()
            _timed(fn, settings.device)
    times: dict[str, list[float]] = {side: [] for side in sides}
    for i in range(settings.repeats):
        order = list(sides) if i % 2 == 0 else list(sides)[::-1]
        for side in order:
            if before is not None:
                before()
            times[side].append(_timed(sides[side], settings.device))
        _log(settings, f"{name}: repeat {i + 1}/{settings.repeats}  " + "  ".join(
            f"{side} {times[side][-1]:.4f}s" for side in sides))
    fd, tv = statistics.median(times["focaldet"]), statistics.median(times["torchvision"])
    return {"focaldet": fd, "torchvision": tv, "ratio": tv / fd}


# Dense bf16/fp16 tensor-core peaks (TFLOP/s, from the vendor's data sheets) by device name,
# for the share of the peak a training step reaches under --amp.
GPU_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


def step_flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations of one call of ``fn`` (forward and backward included), as
    ``torch.utils.flop_counter`` counts them: matmuls and convolutions only."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _gpu_peak_tflops(settings: Settings) -> float | None:
    if not settings.device.startswith("cuda") or settings.amp is None:
        return None
    name = torch.cuda.get_device_name(torch.device(settings.device))
    return next((peak for key, peak in GPU_PEAK_TFLOPS.items() if key in name), None)


def _flops_note(flops: dict[str, int], seconds: dict[str, float], settings: Settings) -> str:
    """``"45 GFLOP/step; 0.041 / 0.036 TFLOP/s"`` (focaldet / torchvision), plus the share
    of the GPU's peak under AMP when the GPU is known."""
    rates = {side: flops[side] / seconds[side] / 1e12 for side in flops}
    note = f"{flops['focaldet'] / 1e9:.1f} GFLOP/step"
    note += " on both sides" if flops["focaldet"] == flops["torchvision"] else \
        f" (torchvision {flops['torchvision'] / 1e9:.1f})"
    note += f"; {rates['focaldet']:.3g} / {rates['torchvision']:.3g} TFLOP/s"
    peak = _gpu_peak_tflops(settings)
    if peak:
        note += (f" = {100 * rates['focaldet'] / peak:.1f} % / {100 * rates['torchvision'] / peak:.1f} % "
                 f"of the {settings.amp} peak ({peak:g})")
    return note


def _autocast(settings: Settings):
    if settings.amp is None:
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[settings.amp]
    return torch.autocast(torch.device(settings.device).type, dtype=dtype)


# --------------------------------------------------------------------------- models and inputs
def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` of ``module`` by a ``FrozenBatchNorm2d`` with the same
    statistics and affine parameters (in place; returns ``module``)."""
    from torchvision.ops import FrozenBatchNorm2d

    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.load_state_dict({k: v for k, v in child.state_dict().items() if k != "num_batches_tracked"})
            setattr(module, name, frozen.to(child.weight.device))
        else:
            freeze_batchnorm(child)
    return module


def build_pair(settings: Settings, size: int, frozen_bn: bool, cls_bias: float | None = None):
    """``(torchvision RetinaNet, focaldet RetinaNet)`` with identical weights: ResNet-50-FPN,
    ``num_classes`` classes, random init (no downloads), transform resizing to ``size``
    (inputs of that size are not rescaled), everything trainable on both sides.

    ``frozen_bn`` swaps torchvision's BatchNorm2d for FrozenBatchNorm2d (focaldet's
    backbone always uses frozen BN), so that train-mode steps compute the same thing.
    ``cls_bias`` overrides the class logit bias (to get many detections from random weights).
    """
    from torchvision.models.detection import retinanet_resnet50_fpn

    from focaldet.models import RetinaNet

    torch.manual_seed(settings.seed)
    tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=settings.num_classes,
                                min_size=size, max_size=size)
    if frozen_bn:
        freeze_batchnorm(tv)
    if cls_bias is not None:
        with torch.no_grad():
            tv.head.classification_head.cls_logits.bias.fill_(cls_bias)
    tv = tv.to(settings.device)
    fd = RetinaNet.from_torchvision(tv, channels_last=settings.channels_last)
    return tv, fd


def random_targets(n: int, g: int, size: int, num_classes: int, seed: int, device: str) -> tuple[Tensor, Tensor]:
    """``(boxes (n, g, 4), labels (n, g))``: boxes of 16 px to 40 % of ``size``, inside the image."""
    gen = torch.Generator().manual_seed(seed)
    wh = 16 + torch.rand(n, g, 2, generator=gen) * (0.4 * size - 16)
    xy = torch.rand(n, g, 2, generator=gen) * (size - wh)
    boxes = torch.cat([xy, xy + wh], dim=-1)
    labels = torch.randint(0, num_classes, (n, g), generator=gen)
    return boxes.to(device), labels.to(device)


def _criterion(fd, settings: Settings):
    from focaldet.losses import L1Loss, RetinaNetCriterion, SigmoidFocalLoss

    # torchvision v1's losses: sigmoid focal loss (alpha 0.25, gamma 2) and L1 on deltas
    return RetinaNetCriterion(cls_loss=SigmoidFocalLoss(compile=settings.compile), box_loss=L1Loss(),
                              box_coder=fd.box_coder)


def _focaldet_forward(fd, images: Tensor, sizes: Tensor) -> dict:
    """``RetinaNetModule``'s forward: normalise the padded uint8 batch and run."""
    return fd(fd.normalize(images, sizes))


def focaldet_train_step(fd, criterion, settings: Settings) -> Callable[..., None]:
    """``run(images, sizes, boxes, labels)``: forward + loss + backward of focaldet's model on
    a padded uint8 batch, as ``RetinaNetModule`` does."""

    def run(images: Tensor, sizes: Tensor, boxes: Tensor, labels: Tensor) -> None:
        with _autocast(settings):
            loss = criterion(_focaldet_forward(fd, images, sizes), boxes, labels)["loss"]
        loss.backward()

    return run


def torchvision_train_step(tv, settings: Settings) -> Callable[..., None]:
    """``run(images, sizes, boxes, labels)``: the same for torchvision's model, which takes a
    list of float images (in its NCHW layout) and resizes nothing."""

    def run(images: Tensor, sizes: Tensor, boxes: Tensor, labels: Tensor) -> None:
        s = images.shape[-1]
        tv.transform.min_size, tv.transform.max_size = (s,), s  # never resize
        batch = [img.float() / 255 for img in images]
        targets = [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels)]
        with _autocast(settings):
            losses = tv(batch, targets)
        sum(losses.values()).backward()

    return run


def _padded_batch(n: int, s: int, gen: torch.Generator, settings: Settings) -> Tensor:
    """A uint8 ``(n, 3, s, s)`` batch in the memory order ``collate_detection`` gives focaldet."""
    images = torch.randint(0, 256, (n, 3, s, s), generator=gen, dtype=torch.uint8)
    if settings.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images.to(settings.device)


def _warm_compile(settings: Settings, criterion, outputs_fn: Callable[[], dict], boxes, labels) -> None:
    if settings.compile:
        _log(settings, "compiling the fused focal loss (torch.compile; ~20 s the first time) ...")
        t = time.perf_counter()
        criterion(outputs_fn(), boxes, labels)["loss"].backward()
        _log(settings, f"compiled in {time.perf_counter() - t:.1f}s")


# --------------------------------------------------------------------------- cases
def case_train_step(settings: Settings) -> dict[str, float]:
    """Forward + loss + backward on a padded uint8 batch (both sides with frozen BN)."""
    n, s, dev = settings.batch, settings.size, settings.device
    tv, fd = build_pair(settings, s, frozen_bn=True)
    tv.train(), fd.train()
    criterion = _criterion(fd, settings)
    gen = torch.Generator().manual_seed(settings.seed + 1)
    images = _padded_batch(n, s, gen, settings)
    sizes = torch.tensor([[s, s]] * n, device=dev)
    boxes, labels = random_targets(n, settings.gt_per_image, s, settings.num_classes, settings.seed + 2, dev)
    fd_run, tv_run = focaldet_train_step(fd, criterion, settings), torchvision_train_step(tv, settings)
    tv_images = images.contiguous()  # torchvision's own layout, NCHW

    def focaldet_step():
        fd_run(images, sizes, boxes, labels)

    def torchvision_step():
        tv_run(tv_images, sizes, boxes, labels)

    def zero_grad():
        fd.zero_grad(set_to_none=True)
        tv.zero_grad(set_to_none=True)

    if settings.compile:
        _warm_compile(settings, criterion, lambda: _focaldet_forward(fd, images, sizes), boxes, labels)
        zero_grad()
    result = compare("train_step", focaldet_step, torchvision_step, settings, before=zero_grad)
    flops = {"focaldet": step_flops(focaldet_step), "torchvision": step_flops(torchvision_step)}
    zero_grad()
    settings.notes["train_step"] = _flops_note(flops, result, settings)
    return result


def _head_outputs(settings: Settings, n: int, size: int, bias_mean: float, seed: int):
    """Random head outputs of ``n`` images of ``size`` px in both layouts: focaldet's per
    level ``(N, Ri, C)`` list and torchvision's concatenated ``(N, R, C)``, plus anchors
    (flat, and as focaldet's per-level grids)."""
    from focaldet.modeling import AnchorGenerator

    dev, k = settings.device, settings.num_classes
    gen_anchors = AnchorGenerator(sizes=(32, 64, 128, 256, 512), torchvision_compat=True)
    shapes = gen_anchors.feature_shapes(size, size)
    anchors, grids = gen_anchors.anchors_and_grids(shapes, dev, image_size=(size, size))
    counts = gen_anchors.num_per_level(shapes)
    gen = torch.Generator().manual_seed(seed)
    r = anchors.shape[0]
    logits = (torch.randn(n, r, k, generator=gen) * 0.5 + bias_mean).to(dev)
    deltas = (torch.randn(n, r, 4, generator=gen) * 0.1).to(dev)
    return logits, deltas, anchors, grids, counts


def case_loss(settings: Settings) -> dict[str, float]:
    """Target assignment + focal and box losses + backward w.r.t. the given head outputs."""
    from torchvision.models.detection import retinanet_resnet50_fpn

    from focaldet.models import RetinaNet

    n, s, dev = settings.loss_batch, settings.loss_size, settings.device
    torch.manual_seed(settings.seed)
    tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=settings.num_classes,
                                min_size=s, max_size=s).to(dev)
    fd = RetinaNet.from_torchvision(tv)
    criterion = _criterion(fd, settings)
    logits, deltas, anchors, grids, counts = _head_outputs(settings, n, s, bias_mean=-4.6, seed=settings.seed + 3)
    boxes, labels = random_targets(n, settings.loss_gt, s, settings.num_classes, settings.seed + 4, dev)
    _log(settings, f"loss: {n} images x {anchors.shape[0]} anchors x {settings.num_classes} classes "
                   f"= {logits.numel() / 1e6:.1f}M logits, {settings.loss_gt} boxes per image")
    # each side gets the head outputs in its own model's layout, as leaves
    tv_cls, tv_reg = logits.clone().requires_grad_(), deltas.clone().requires_grad_()
    fd_cls = [t.clone().requires_grad_() for t in logits.split(counts, dim=1)]
    fd_reg = [t.clone().requires_grad_() for t in deltas.split(counts, dim=1)]
    tv_targets = [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels)]
    tv_anchors = [anchors] * n
    del logits, deltas

    def fd_outputs():
        return {"cls_logits": fd_cls, "box_deltas": fd_reg, "anchors": anchors, "anchor_grids": grids}

    def focaldet_loss():
        criterion(fd_outputs(), boxes, labels)["loss"].backward()

    def torchvision_loss():
        losses = tv.compute_loss(tv_targets, {"cls_logits": tv_cls, "bbox_regression": tv_reg}, tv_anchors)
        sum(losses.values()).backward()

    def clear():
        for t in [tv_cls, tv_reg, *fd_cls, *fd_reg]:
            t.grad = None

    _warm_compile(settings, criterion, fd_outputs, boxes, labels)
    clear()
    return compare("loss", focaldet_loss, torchvision_loss, settings, before=clear)


def case_postprocess(settings: Settings) -> dict[str, float]:
    """Scores, top-k, decode, clip and NMS from given head outputs (scores mostly 0.1-0.5)."""
    from torchvision.models.detection import retinanet_resnet50_fpn

    from focaldet.models import RetinaNet

    n, s, dev = settings.loss_batch, settings.loss_size, settings.device
    torch.manual_seed(settings.seed)
    tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=settings.num_classes,
                                min_size=s, max_size=s).to(dev).eval()
    fd = RetinaNet.from_torchvision(tv)
    # logit -1.1 +- 0.5: sigmoid ~0.1-0.5, every level has >= 1000 candidates above 0.05
    logits, deltas, anchors, _, counts = _head_outputs(settings, n, s, bias_mean=-1.1, seed=settings.seed + 5)
    split = {"cls_logits": list(logits.split(counts, dim=1)), "bbox_regression": list(deltas.split(counts, dim=1))}
    tv_anchors = [list(anchors.split(counts))] * n
    shapes = [(s, s)] * n
    fd_outputs = {"cls_logits": split["cls_logits"], "box_deltas": split["bbox_regression"], "anchors": anchors}
    sizes = torch.tensor(shapes, device=dev)
    above = min(int((t[0].sigmoid() > fd.postprocess.score_thresh).sum()) for t in split["cls_logits"])
    _log(settings, f"postprocess: {n} images, >= {above} candidates per level above the score threshold")

    def focaldet_post():
        return fd.detect(fd_outputs, sizes)

    def torchvision_post():
        return tv.postprocess_detections(split, tv_anchors, shapes)

    with torch.no_grad():
        settings.notes["postprocess"] = _match_note(focaldet_post(), torchvision_post())
    with torch.no_grad():
        return compare("postprocess", focaldet_post, torchvision_post, settings)


def _detections_match(a: dict[str, Tensor], b: dict[str, Tensor], score_atol: float = 1e-4,
                      box_atol: float = 1e-3) -> float:
    """Fraction of the detections of ``a`` and ``b`` that have a counterpart on the other side
    (same label, score within ``score_atol``, box within ``box_atol`` px): 1.0 when both
    hold the same detections, whatever the order of equal scores."""
    if len(a["scores"]) == 0 or len(b["scores"]) == 0:
        return float(len(a["scores"]) == len(b["scores"]))
    close = ((a["scores"][:, None] - b["scores"][None]).abs() <= score_atol) \
        & (a["labels"][:, None] == b["labels"][None]) \
        & ((a["boxes"][:, None] - b["boxes"][None]).abs().amax(dim=-1) <= box_atol)  # (Na, Nb)
    matched = int(close.any(dim=1).sum()) + int(close.any(dim=0).sum())
    return matched / (len(a["scores"]) + len(b["scores"]))


def _match_note(fd_dets: list[dict[str, Tensor]], tv_dets: list[dict[str, Tensor]]) -> str:
    total = sum(len(d["scores"]) for d in fd_dets)
    fraction = min(_detections_match(a, b) for a, b in zip(fd_dets, tv_dets))
    if fraction == 1.0:
        return f"{total} detections, the same as torchvision's"
    return f"{total} detections; worst image: {100 * fraction:.1f}% match torchvision's"


def case_inference(settings: Settings) -> dict[str, float]:
    """List of float images in [0, 1] -> detections in input pixels, eval mode.
    torchvision keeps its BatchNorm2d (eval mode); focaldet folds its frozen BN into the
    convolutions (``RetinaNet.fuse_batchnorm``, as a deployment would) unless ``--keep-bn``."""
    n, s, dev = settings.batch, settings.size, settings.device
    tv, fd = build_pair(settings, s, frozen_bn=False, cls_bias=-1.5)
    tv.eval(), fd.eval()
    if settings.fuse_bn:
        fd.fuse_batchnorm()
    gen = torch.Generator().manual_seed(settings.seed + 6)
    images = [torch.rand(3, s, s, generator=gen).to(dev) for _ in range(n)]

    def focaldet_infer():
        return fd.predict(images)

    def torchvision_infer():
        return tv(images)

    with torch.inference_mode(), _autocast(settings):
        if settings.amp is None:
            settings.notes["inference"] = _match_note(focaldet_infer(), torchvision_infer())
        else:  # reduced-precision logits: the two sides round differently, no exact match
            settings.notes["inference"] = f"AMP {settings.amp}: detections not compared"
        return compare("inference", focaldet_infer, torchvision_infer, settings)


# --------------------------------------------------------------------------- data
class _DecodeOnly(torch.utils.data.Dataset):
    """The decode limit: the pipeline's own decoder (``read_image``: the file's bytes ->
    RGB array, the fastest way OpenCV offers) on each file, nothing else. Only the image's
    shape goes back to the main process (sending the pixels would cost a pickled copy per
    image, more than the pipeline's shared-memory batches cost)."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from focaldet.data import read_image

        return read_image(self.paths[i]).shape


def _list_collate(batch):
    return batch


def _data_source(settings: Settings, tmp: Path) -> tuple[Path, Path, str]:
    """``(train_ann, images_dir, name)``: BCCD when present, else a synthetic set in ``tmp``."""
    root = settings.data_dir if settings.data_dir is not None else BCCD_DIR
    ann = root / "annotations" / "instances_train.json"
    if ann.is_file():
        return ann, root / "images", f"BCCD ({root})"
    from focaldet.data.synth import write_synthetic_coco

    n = max(settings.data_images, 32)
    _log(settings, f"data: {ann} not found; writing {n} synthetic 640 px images")
    synth = write_synthetic_coco(tmp, num_images=n, seed=settings.seed, num_classes=4, image_size=640,
                                 val_fraction=0.1)
    return synth.train_ann, synth.images, "synthetic shapes, 640 px"


def _images_per_second(loader, count: Callable[[Any], int]) -> float:
    """Images/s over one whole epoch of ``loader``, whose persistent workers were started by
    the warm-up epoch (a whole epoch, so no prefetched work runs into the other side's)."""
    start = time.perf_counter()
    done = sum(count(batch) for batch in loader)
    return done / (time.perf_counter() - start)


def case_data(settings: Settings) -> dict[str, float]:
    """Training pipeline (CocoDataModule: decode + resize + flip + collate) images/s against
    decoding the same JPEGs alone, same batch size and workers; ratio = pipeline / decode.

    The note adds a third loader, the same dataset without augmentation (decode, pack,
    collate, deliver the batch to this process): the floor of any pipeline that hands the
    pixels over through DataLoader workers, as a share of the decode limit."""
    from torch.utils.data import DataLoader

    from focaldet.data import CocoDataModule, collate_detection

    with tempfile.TemporaryDirectory(prefix="focaldet-bench-") as tmp:
        ann, image_dir, name = _data_source(settings, Path(tmp))
        # configs/bccd.yaml's training resolution
        dm = CocoDataModule(train_ann=str(ann), train_images=str(image_dir), batch_size=settings.data_batch,
                            num_workers=settings.workers, min_size=[288, 320, 352], max_size=640,
                            persistent_workers=True)
        dm.setup("fit")
        dataset = dm.datasets["train"]
        limit = min(settings.data_images or len(dataset), len(dataset))
        if limit < len(dataset):
            dm.datasets["train"] = torch.utils.data.Subset(dataset, range(limit))
        paths = [str(dataset.image_dir / rec["file_name"]) for rec in dataset.records[:limit]]
        pipeline = dm.train_dataloader()  # also makes OpenCV single-threaded before any worker forks
        loader = functools.partial(DataLoader, batch_size=settings.data_batch, shuffle=True,
                                   num_workers=settings.workers, persistent_workers=settings.workers > 0)
        decode = loader(_DecodeOnly(paths), collate_fn=_list_collate)
        bare = copy.copy(dataset)  # the same records, no augmentation
        bare.transforms = None
        floor = loader(torch.utils.data.Subset(bare, range(limit)), collate_fn=collate_detection)
        _log(settings, f"data: {name}, {limit} images per epoch, batch {settings.data_batch}, "
                       f"{settings.workers} workers")
        rates: dict[str, list[float]] = {"focaldet": [], "torchvision": [], "floor": []}
        runs = {
            "focaldet": lambda: _images_per_second(pipeline, lambda b: len(b["images"])),
            "torchvision": lambda: _images_per_second(decode, len),
            "floor": lambda: _images_per_second(floor, lambda b: len(b["images"])),
        }
        warmup = max(1, settings.warmup)  # at least one epoch: it starts the persistent workers
        for i in range(warmup):
            for side, fn in runs.items():
                _log(settings, f"data: warm-up epoch {i + 1}/{warmup} {side}")
                fn()
        for i in range(settings.repeats):
            order = list(runs) if i % 2 == 0 else list(runs)[::-1]
            for side in order:
                rates[side].append(runs[side]())
            _log(settings, f"data: repeat {i + 1}/{settings.repeats}  pipeline {rates['focaldet'][-1]:.1f} img/s  "
                           f"decode-only {rates['torchvision'][-1]:.1f} img/s  "
                           f"no augmentation {rates['floor'][-1]:.1f} img/s")
        del pipeline, decode, floor
    fd, tv, bare_rate = (statistics.median(rates[k]) for k in ("focaldet", "torchvision", "floor"))
    settings.notes["data"] = (f"{name}; torchvision column = decode-only limit; without augmentation "
                              f"{bare_rate:.0f} img/s = {bare_rate / tv:.2f} of it (pipeline = {fd / bare_rate:.2f} of that)")
    return {"focaldet": fd, "torchvision": tv, "ratio": fd / tv}


# --------------------------------------------------------------------------- eval
def synthetic_coco_eval_data(num_images: int, dets_per_image: int, seed: int, num_classes: int = 80):
    """``(gt dataset dict, results list)``: 2-12 gt boxes per image; detections are jittered
    copies of the gt (true positives of varying quality) plus random boxes, with scores."""
    import numpy as np

    rng = np.random.default_rng(seed)
    images, anns, results = [], [], []
    cats = [{"id": c + 1, "name": f"class{c}"} for c in range(num_classes)]
    for image_id in range(1, num_images + 1):
        w, h = 640, 480
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": w, "height": h})
        g = int(rng.integers(2, 13))
        bw = rng.uniform(8, 200, g)
        bh = rng.uniform(8, 200, g)
        x = rng.uniform(0, w - bw)
        y = rng.uniform(0, h - bh)
        c = rng.integers(1, num_classes + 1, g)
        for j in range(g):
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(c[j]), "iscrowd": 0,
                         "bbox": [float(x[j]), float(y[j]), float(bw[j]), float(bh[j])],
                         "area": float(bw[j] * bh[j])})
        for j in range(dets_per_image):
            if j < 2 * g:  # jittered gt, right or wrong class
                k = j % g
                jit = rng.normal(0, 0.1, 4) * [bw[k], bh[k], bw[k], bh[k]]
                box = [x[k] + jit[0], y[k] + jit[1], max(bw[k] + jit[2], 1.0), max(bh[k] + jit[3], 1.0)]
                cat = int(c[k]) if rng.random() < 0.8 else int(rng.integers(1, num_classes + 1))
                score = float(rng.uniform(0.3, 1.0))
            else:
                bwr, bhr = rng.uniform(8, 200, 2)
                box = [rng.uniform(0, w - bwr), rng.uniform(0, h - bhr), bwr, bhr]
                cat = int(rng.integers(1, num_classes + 1))
                score = float(rng.uniform(0.0, 0.5))
            results.append({"image_id": image_id, "category_id": cat, "bbox": [float(v) for v in box],
                            "score": round(score, 5)})
    return {"images": images, "annotations": anns, "categories": cats}, results


def case_eval(settings: Settings) -> dict[str, float]:
    """``evaluate_coco`` of the same detections with faster-coco-eval (focaldet column) and
    pycocotools (torchvision column: what torchvision's reference scripts use)."""
    from faster_coco_eval import COCO as FasterCOCO
    from pycocotools.coco import COCO

    from focaldet.evaluation import evaluate_coco

    dataset, results = synthetic_coco_eval_data(settings.eval_images, settings.eval_dets, settings.seed + 7)
    _log(settings, f"eval: {settings.eval_images} images x {settings.eval_dets} detections "
                   f"({len(dataset['annotations'])} gt boxes)")
    gts = {}
    for backend, coco_cls in (("faster_coco_eval", FasterCOCO), ("pycocotools", COCO)):
        with contextlib.redirect_stdout(None):  # ground truth indexed once, as in training
            gts[backend] = coco_cls()
            gts[backend].dataset = dataset
            gts[backend].createIndex()
    out: dict[str, Any] = {}

    def run(backend):
        out[backend] = evaluate_coco(gts[backend], results, backend=backend)

    timing = compare("eval", lambda: run("faster_coco_eval"), lambda: run("pycocotools"), settings)
    a, b = out["faster_coco_eval"].stats, out["pycocotools"].stats
    diff = max(abs(a[k] - b[k]) for k in a)
    settings.notes["eval"] = f"12 stats max |diff| = {diff:.2e} (mAP {b['mAP']:.4f})"
    if diff > 1e-4:
        raise AssertionError(f"faster-coco-eval and pycocotools disagree: max |diff| {diff:.2e}\n{a}\n{b}")
    return timing


# --------------------------------------------------------------------------- memory
def _rss_bytes(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field_name} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# glibc's mmap threshold in the measuring process, fixed (which also turns off its dynamic
# raising): every tensor buffer >= 64 KiB is then mapped when allocated and unmapped when
# freed, so RSS follows live tensor memory rather than the allocator's retention history.
# Measured this way the result repeats to 0.1 MiB; with glibc's defaults it scatters by
# +-30 MB from run to run.
MMAP_THRESHOLD = 64 * 1024


@contextlib.contextmanager
def _child_env(**env: str):
    """Environment variables set while a child process is started (inherited by it only)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _memory_child(side: str, settings: Settings, queue) -> None:
    """One training step of one side in a fresh process; puts the peak RSS growth in bytes."""
    try:
        torch.set_num_threads(1)  # the peak then cannot depend on how threads interleave
        settings = copy.copy(settings)
        settings.verbose = False
        step, warm_up = _train_step_fn(side, settings)
        warm_up()
        before = _rss_bytes("VmRSS")
        if not _reset_peak_rss():
            before = max(before, _rss_bytes("VmHWM"))  # growth is then a lower bound
        step()
        queue.put(("ok", _rss_bytes("VmHWM") - before))
    except BaseException as e:  # report, never hang the parent
        queue.put(("error", f"{type(e).__name__}: {e}"))


def _train_step_fn(side: str, settings: Settings) -> tuple[Callable[[], None], Callable[[], None]]:
    """``(step, warm_up)`` of one side (the other model is freed): one training step on the
    benchmark batch, and one on a single 64 px image followed by freeing the gradients,
    which loads what a process initialises lazily on its first step (MKL and oneDNN
    kernels, caches) without leaving large buffers behind."""
    dev = settings.device
    tv, fd = build_pair(settings, settings.size, frozen_bn=True)

    def inputs(n: int, s: int, g: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        images = _padded_batch(n, s, gen, settings)
        if side != "focaldet":
            images = images.contiguous()  # torchvision's own layout, NCHW
        sizes = torch.tensor([[s, s]] * n, device=dev)
        return (images, sizes, *random_targets(n, g, s, settings.num_classes, seed + 1, dev))

    if side == "focaldet":
        del tv
        model = fd.train()
        run = focaldet_train_step(fd, _criterion(fd, settings), settings)
    else:
        del fd
        model = tv.train()
        run = torchvision_train_step(tv, settings)

    main = inputs(settings.batch, settings.size, settings.gt_per_image, settings.seed + 1)
    tiny = inputs(1, 64, 1, settings.seed + 9)

    def warm_up():
        run(*tiny)
        model.zero_grad(set_to_none=True)
        gc.collect()

    gc.collect()
    return (lambda: run(*main)), warm_up


def case_memory(settings: Settings) -> dict[str, float]:
    """Peak memory of one training step: CUDA ``max_memory_allocated`` growth (in process),
    or on CPU the peak RSS growth (VmHWM after - VmRSS before) in a fresh spawned process
    per side, so that neither side's allocator state or caches affect the other."""
    peaks: dict[str, int] = {}
    if settings.device.startswith("cuda"):
        for side in ("focaldet", "torchvision"):
            _log(settings, f"memory: {side} (max_memory_allocated)")
            step, warm_up = _train_step_fn(side, settings)
            warm_up()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peaks[side] = torch.cuda.max_memory_allocated() - base
            del step, warm_up
            gc.collect()
            torch.cuda.empty_cache()
        method = "CUDA max_memory_allocated growth of one step, after a 64 px warm-up step"
    else:
        ctx = mp.get_context("spawn")
        runs = max(1, settings.memory_runs)
        samples: dict[str, list[int]] = {"focaldet": [], "torchvision": []}
        for i in range(runs):
            for side in (("focaldet", "torchvision") if i % 2 == 0 else ("torchvision", "focaldet")):
                queue = ctx.Queue()
                proc = ctx.Process(target=_memory_child, args=(side, settings, queue))
                with _child_env(MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD)):
                    proc.start()
                status, value = queue.get(timeout=1800)
                proc.join()
                if status != "ok":
                    raise RuntimeError(f"memory child ({side}) failed: {value}")
                samples[side].append(int(value))
                _log(settings, f"memory: run {i + 1}/{runs} {side}: peak RSS growth {value / 2**20:.1f} MiB "
                               "(fresh process, 1 thread)")
        peaks = {side: int(statistics.median(v)) for side, v in samples.items()}
        method = "peak RSS growth of one step (fresh process per side, see docs/benchmarks.md)"
    settings.notes["memory"] = method
    return {"focaldet": peaks["focaldet"], "torchvision": peaks["torchvision"],
            "ratio": peaks["torchvision"] / max(peaks["focaldet"], 1)}


CASE_FUNCS: dict[str, Callable[[Settings], dict[str, float]]] = {
    "train_step": case_train_step,
    "loss": case_loss,
    "postprocess": case_postprocess,
    "inference": case_inference,
    "data": case_data,
    "eval": case_eval,
    "memory": case_memory,
}

UNITS = {"train_step": "s", "loss": "s", "postprocess": "s", "inference": "s", "data": "img/s", "eval": "s",
         "memory": "MiB"}
# The ratios focaldet aims at (docs/benchmarks.md "Targets"); on GPU train_step aims at 1.3.
TARGETS = {"train_step": 1.0, "loss": 5.0, "postprocess": 3.0, "inference": 1.2, "data": 0.8, "eval": 3.0,
           "memory": 1.0}
GPU_TARGETS = {**TARGETS, "train_step": 1.3}


# --------------------------------------------------------------------------- report
def format_table(results: dict[str, dict[str, float]], notes: dict[str, str] | None = None) -> str:
    """Medians per case and the ratio (> 1: focaldet better)."""
    lines = [f"{'case':<12} {'unit':<6} {'focaldet':>12} {'torchvision':>12} {'ratio':>7}  note",
             "-" * 78]
    for case, r in results.items():
        unit = UNITS.get(case, "")
        scale = 1 / 2**20 if unit == "MiB" else 1.0
        fmt = "{:>12.1f}" if unit in ("MiB", "img/s") else "{:>12.4f}"
        note = (notes or {}).get(case, "")
        lines.append(f"{case:<12} {unit:<6} " + fmt.format(r["focaldet"] * scale) + " "
                     + fmt.format(r["torchvision"] * scale) + f" {r['ratio']:>6.2f}x  {note}")
    lines.append("ratio: torchvision/focaldet for times and memory, pipeline/decode-only for data; "
                 "> 1 favours focaldet")
    return "\n".join(lines)


def plot_ratios(results: dict[str, dict[str, float]], path: str | os.PathLike, title: str = "",
                device: str = "cpu") -> Path:
    """Save the ratios as a bar chart (log scale) with each case's target on ``device``
    marked: green bars meet it, red bars miss it."""
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas

    goals = TARGETS if device == "cpu" else GPU_TARGETS
    cases = list(results)[::-1]  # first case on top
    ratios = [results[c]["ratio"] for c in cases]
    targets = [goals.get(c, 1.0) for c in cases]
    fig = Figure(figsize=(7, 1.2 + 0.45 * len(cases)), dpi=120, layout="constrained")
    ax = fig.subplots()
    ax.barh(cases, ratios, color=["tab:green" if r >= t else "tab:red" for r, t in zip(ratios, targets)])
    ax.scatter(targets, cases, marker="|", s=400, color="black", zorder=3, label="target")
    for i, r in enumerate(ratios):
        ax.annotate(f"{r:.2f}x", (r, i), xytext=(4, 0), textcoords="offset points", va="center")
    ax.axvline(1.0, color="gray", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlim(min(0.1, *ratios) * 0.8, max(*ratios, *targets) * 2)
    ax.set_xlabel("torchvision / focaldet (data: pipeline / decode limit); > 1 favours focaldet")
    ax.legend(loc="lower right", fontsize="small")
    ax.set_title(title or "focaldet vs torchvision RetinaNet", fontsize="medium")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def run_cases(cases: Sequence[str], settings: Settings) -> dict[str, dict[str, float]]:
    results = {}
    for case in cases:
        _log(settings, f"=== {case}")
        start = time.perf_counter()
        results[case] = CASE_FUNCS[case](settings)
        r = results[case]
        _log(settings, f"{case}: focaldet {r['focaldet']:.4g}  torchvision {r['torchvision']:.4g}  "
                       f"ratio {r['ratio']:.2f}x  ({time.perf_counter() - start:.0f}s)")
    return results


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="focaldet bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--quick", action="store_true", help="tiny sizes and 2 repeats (a smoke run)")
    p.add_argument("--json", metavar="FILE", help="write {case: {focaldet, torchvision, ratio}} to FILE")
    p.add_argument("--plot", metavar="FILE", help="write a bar chart of the ratios and targets to FILE (PNG)")
    p.add_argument("--device", default=None, help="cpu | cuda[:i] (default: cuda when available)")
    p.add_argument("--size", type=int, help="image side for train_step/inference/memory (default 320)")
    p.add_argument("--batch", type=int, help="batch for train_step/inference/memory (default 2)")
    p.add_argument("--loss-size", type=int, help="image side for loss/postprocess (default 512)")
    p.add_argument("--loss-batch", type=int, help="batch for loss/postprocess (default 8)")
    p.add_argument("--num-classes", type=int, help="classes (default 80)")
    p.add_argument("--amp", choices=("bf16", "fp16"), help="autocast dtype for train_step/inference/memory")
    p.add_argument("--compile", action="store_true", help="focaldet's focal loss through torch.compile")
    p.add_argument("--channels-first", action="store_true",
                   help="focaldet's model in NCHW, as RetinaNetModule(channels_last=False) (default: NHWC)")
    p.add_argument("--keep-bn", action="store_true",
                   help="inference: keep focaldet's frozen BN (default: folded into the convolutions)")
    p.add_argument("--repeats", type=int, help="timed calls per side (default 5; 2 with --quick)")
    p.add_argument("--warmup", type=int, help="untimed calls per side first (default 1)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--workers", type=int, help="data loader workers for the data case (default 2)")
    p.add_argument("--data-dir", type=Path, help=f"COCO-layout dataset for the data case (default {BCCD_DIR})")
    p.add_argument("--eval-images", type=int, help="images of the eval case (default 2000)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = (Settings.quick if args.quick else Settings)(device=device, amp=args.amp, compile=args.compile,
                                                          channels_last=not args.channels_first,
                                                          fuse_bn=not args.keep_bn, verbose=not args.quiet)
    for name in ("size", "batch", "loss_size", "loss_batch", "num_classes", "repeats", "warmup", "workers",
                 "data_dir", "eval_images"):
        value = getattr(args, name)
        if value is not None:
            setattr(settings, name, value)
    settings.threads = args.threads or 0
    return settings


def _warn_if_busy(settings: Settings) -> None:
    """Timings mean little while other processes compete for the cores: with OpenMP every
    parallel region then waits for a descheduled thread (measured here: 10x-100x slower)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return
    cpus = os.cpu_count() or 1
    if load > 0.5 * cpus:
        print(f"[bench] WARNING: load average {load:.1f} on {cpus} CPUs before starting: other processes "
              "compete for the cores and the timings will be unreliable", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """``focaldet bench``; returns the exit status."""
    args = _parser().parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        print(f"focaldet bench: unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}", file=sys.stderr)
        return 2
    settings = settings_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        print("focaldet bench: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    _log(settings, f"device {settings.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
                   f"amp {settings.amp}, compile {settings.compile}, channels_last {settings.channels_last}, "
                   f"fuse_bn {settings.fuse_bn}, "
                   f"repeats {settings.repeats}")
    _warn_if_busy(settings)
    results = run_cases(cases, settings)
    print(format_table(results, settings.notes))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.plot:
        title = f"focaldet vs torchvision RetinaNet ({settings.device}, torch {torch.__version__})"
        _log(settings, f"wrote {plot_ratios(results, args.plot, title, settings.device.split(':')[0])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
