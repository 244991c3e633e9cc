"""Case ``loss_scaling``: the ``loss`` case at 10, 100, 500 and 2000 boxes per image
(crowded scenes), side by side with torchvision at each, plus focaldet's peak memory at the
largest count."""

from __future__ import annotations

import torch

from focaldet.bench.harness import Case, Settings, compare, log
from focaldet.bench.memory import peak_rss_growth
from focaldet.bench.models import build_criterion, head_outputs

BOX_COUNTS = (10, 100, 500, 2000)  # boxes per image; JSON keys loss_g10 ... loss_g2000
QUICK_BOX_COUNTS = (5, 10, 50, 200)  # --quick: 1 image of 256 px
IMAGES, SIZE = 2, 512  # 49,104 anchors per image


def crowded_targets(n: int, g: int, size: int, num_classes: int, seed: int, device: str):
    """``(boxes (n, g, 4), labels (n, g))``: boxes of 8-68 px (the sizes of crowded scenes'
    objects), inside the image."""
    gen = torch.Generator().manual_seed(seed)
    wh = 8 + torch.rand(n, g, 2, generator=gen) * 60
    xy = torch.rand(n, g, 2, generator=gen) * (size - wh)
    labels = torch.randint(0, num_classes, (n, g), generator=gen)
    return torch.cat([xy, xy + wh], dim=-1).to(device), labels.to(device)


def _shared(settings: Settings, n: int, size: int) -> tuple:
    """What every box count shares: torchvision's RetinaNet (its loss), focaldet's criterion
    for the same model, and one set of head outputs (``logits, deltas, anchors, grids, counts``)."""
    from torchvision.models.detection import retinanet_resnet50_fpn

    from focaldet.models import RetinaNet

    torch.manual_seed(settings.seed)
    tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=settings.num_classes,
                                min_size=size, max_size=size).to(settings.device)
    criterion = build_criterion(RetinaNet.from_torchvision(tv), settings)
    return tv, criterion, *head_outputs(settings, n, size, bias_mean=-4.6, seed=settings.seed + 3)


def _sides(settings: Settings, g: int, n: int, size: int, shared: tuple | None = None):
    """``(focaldet_loss, torchvision_loss, clear)`` on the same head outputs and ``g`` boxes per
    image; ``shared`` is `_shared`'s (built here when not given)."""
    tv, criterion, logits, deltas, anchors, grids, counts = shared or _shared(settings, n, size)
    boxes, labels = crowded_targets(n, g, size, settings.num_classes, settings.seed + 4 + g, settings.device)
    tv_cls, tv_reg = logits.clone().requires_grad_(), deltas.clone().requires_grad_()
    fd_cls = [t.clone().requires_grad_() for t in logits.split(counts, dim=1)]
    fd_reg = [t.clone().requires_grad_() for t in deltas.split(counts, dim=1)]
    tv_targets = [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels)]

    def focaldet_loss():
        outputs = {"cls_logits": fd_cls, "box_deltas": fd_reg, "anchors": anchors, "anchor_grids": grids}
        criterion(outputs, boxes, labels)["loss"].backward()

    def torchvision_loss():
        losses = tv.compute_loss(tv_targets, {"cls_logits": tv_cls, "bbox_regression": tv_reg}, [anchors] * n)
        sum(losses.values()).backward()

    def clear():
        for t in [tv_cls, tv_reg, *fd_cls, *fd_reg]:
            t.grad = None

    return focaldet_loss, torchvision_loss, clear


def _warm_loss(settings: Settings, g: int, n: int, size: int):
    """focaldet's loss call, warmed up (lazily loaded kernels, the anchors' cache), gradients cleared."""
    focaldet_loss, _, clear = _sides(settings, g, n, size)
    focaldet_loss()
    clear()
    return focaldet_loss


def peak_memory(settings: Settings, g: int, n: int, size: int) -> int:
    """Bytes focaldet's loss (forward + backward) adds at its peak: CUDA max_memory_allocated,
    on CPU the peak RSS growth in a process of its own."""
    if settings.device.startswith("cuda"):
        focaldet_loss = _warm_loss(settings, g, n, size)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        focaldet_loss()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return peak_rss_growth(_warm_loss, settings, g, n, size, timeout=600)


def case_loss_scaling(settings: Settings) -> dict:
    """``loss_g{G}: {focaldet, torchvision, ratio}`` for each G of BOX_COUNTS; the top-level
    ``focaldet / torchvision / ratio`` are those of the largest G; ``time_growth_x4``:
    focaldet's time at 2000 boxes over its time at 500; ``peak_bytes``: focaldet's peak
    memory at 2000 boxes."""
    quick = settings.loss_size < SIZE
    n, size, counts = (1, 256, QUICK_BOX_COUNTS) if quick else (IMAGES, SIZE, BOX_COUNTS)
    result: dict = {}
    shared = _shared(settings, n, size)
    for g in counts:
        log(settings, f"loss_scaling: {n} images of {size} px, {g} boxes per image")
        focaldet_loss, torchvision_loss, clear = _sides(settings, g, n, size, shared)
        clear()
        result[f"loss_g{g}"] = compare(f"loss_g{g}", focaldet_loss, torchvision_loss, settings, before=clear)
        del focaldet_loss, torchvision_loss, clear
    del shared
    last = result[f"loss_g{counts[-1]}"]
    result.update(last)
    result["time_growth_x4"] = last["focaldet"] / result[f"loss_g{counts[-2]}"]["focaldet"]
    result["peak_bytes"] = peak_memory(settings, counts[-1], n, size)
    settings.notes["loss_scaling"] = ", ".join(
        f"{g}: {result[f'loss_g{g}']['ratio']:.1f}x" for g in counts) + \
        f" (boxes/image); {counts[-2]}->{counts[-1]} boxes: time x{result['time_growth_x4']:.2f}; " \
        f"peak {result['peak_bytes'] / 2**20:.0f} MiB at {counts[-1]}"
    return result


CASE = Case(case_loss_scaling, unit="s", target=5.0)
