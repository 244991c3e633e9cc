"""Case ``inference``: images -> detections in eval mode."""

from __future__ import annotations

import torch

from focaldet.bench.harness import Case, Settings, compare
from focaldet.bench.harness import autocast, match_note
from focaldet.bench.models import build_pair


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

    with torch.inference_mode(), autocast(settings):
        if settings.amp is None:
            settings.notes["inference"] = match_note(focaldet_infer(), torchvision_infer())
        else:  # reduced-precision logits: the two sides round differently, no exact match
            settings.notes["inference"] = f"AMP {settings.amp}: detections not compared"
        return compare("inference", focaldet_infer, torchvision_infer, settings)


CASE = Case(case_inference, unit="s", target=1.2)
