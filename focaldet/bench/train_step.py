"""Case ``train_step``: forward + loss + backward of a batch, both sides with frozen BN."""

from __future__ import annotations

import torch

from focaldet.bench.harness import Case, Settings, compare
from focaldet.bench.harness import flops_note, step_flops
from focaldet.bench.models import (build_criterion, focaldet_forward, padded_batch, warm_compile, build_pair,
                                   focaldet_train_step, random_targets, torchvision_train_step)


def case_train_step(settings: Settings) -> dict[str, float]:
    """Forward + loss + backward on a padded uint8 batch (both sides with frozen BN)."""
    n, s, dev = settings.batch, settings.size, settings.device
    tv, fd = build_pair(settings, s, frozen_bn=True)
    tv.train(), fd.train()
    criterion = build_criterion(fd, settings)
    gen = torch.Generator().manual_seed(settings.seed + 1)
    images = padded_batch(n, s, gen, settings)
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
        warm_compile(settings, criterion, lambda: focaldet_forward(fd, images, sizes), boxes, labels)
        zero_grad()
    result = compare("train_step", focaldet_step, torchvision_step, settings, before=zero_grad)
    flops = {"focaldet": step_flops(focaldet_step), "torchvision": step_flops(torchvision_step)}
    zero_grad()
    settings.notes["train_step"] = flops_note(flops, result, settings)
    return result


CASE = Case(case_train_step, unit="s", target=1.0, gpu_target=1.3)
