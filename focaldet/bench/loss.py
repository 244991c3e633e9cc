"""Case ``loss``: target assignment + both losses + backward, from given head outputs."""

from __future__ import annotations

import torch

from focaldet.bench.harness import Case, Settings, log, compare
from focaldet.bench.models import build_criterion, head_outputs, warm_compile, random_targets


def case_loss(settings: Settings) -> dict[str, float]:
    """Target assignment + focal and box losses + backward w.r.t. the given head outputs."""
    from torchvision.models.detection import retinanet_resnet50_fpn

    from focaldet.models import RetinaNet

    n, s, dev = settings.loss_batch, settings.loss_size, settings.device
    torch.manual_seed(settings.seed)
    tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=settings.num_classes,
                                min_size=s, max_size=s).to(dev)
    fd = RetinaNet.from_torchvision(tv)
    criterion = build_criterion(fd, settings)
    logits, deltas, anchors, grids, counts = head_outputs(settings, n, s, bias_mean=-4.6, seed=settings.seed + 3)
    boxes, labels = random_targets(n, settings.loss_gt, s, settings.num_classes, settings.seed + 4, dev)
    log(settings, f"loss: {n} images x {anchors.shape[0]} anchors x {settings.num_classes} classes "
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

    warm_compile(settings, criterion, fd_outputs, boxes, labels)
    clear()
    return compare("loss", focaldet_loss, torchvision_loss, settings, before=clear)


CASE = Case(case_loss, unit="s", target=5.0)
