"""The models and inputs the cases share: the torchvision / focaldet pair with identical
weights, random targets and batches, and each side's training step."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from focaldet.bench.harness import Settings, autocast, log


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


def build_criterion(fd, settings: Settings):
    from focaldet.losses import L1Loss, RetinaNetCriterion, SigmoidFocalLoss

    # torchvision v1's losses: sigmoid focal loss (alpha 0.25, gamma 2) and L1 on deltas
    return RetinaNetCriterion(cls_loss=SigmoidFocalLoss(compile=settings.compile), box_loss=L1Loss(),
                              box_coder=fd.box_coder)


def focaldet_forward(fd, images: Tensor, sizes: Tensor) -> dict:
    """``RetinaNetModule``'s forward: normalise the padded uint8 batch and run."""
    return fd(fd.normalize(images, sizes))


def focaldet_train_step(fd, criterion, settings: Settings) -> Callable[..., None]:
    """``run(images, sizes, boxes, labels)``: forward + loss + backward of focaldet's model on
    a padded uint8 batch, as ``RetinaNetModule`` does."""

    def run(images: Tensor, sizes: Tensor, boxes: Tensor, labels: Tensor) -> None:
        with autocast(settings):
            loss = criterion(focaldet_forward(fd, images, sizes), boxes, labels)["loss"]
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
        with autocast(settings):
            losses = tv(batch, targets)
        sum(losses.values()).backward()

    return run


def padded_batch(n: int, s: int, gen: torch.Generator, settings: Settings) -> Tensor:
    """A uint8 ``(n, 3, s, s)`` batch in the memory order ``collate_detection`` gives focaldet."""
    images = torch.randint(0, 256, (n, 3, s, s), generator=gen, dtype=torch.uint8)
    if settings.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images.to(settings.device)


def warm_compile(settings: Settings, criterion, outputs_fn: Callable[[], dict], boxes, labels) -> None:
    if settings.compile:
        log(settings, "compiling the fused focal loss (torch.compile; ~20 s the first time) ...")
        t = time.perf_counter()
        criterion(outputs_fn(), boxes, labels)["loss"].backward()
        log(settings, f"compiled in {time.perf_counter() - t:.1f}s")


def head_outputs(settings: Settings, n: int, size: int, bias_mean: float, seed: int):
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
