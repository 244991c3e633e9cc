"""Build a focaldet RetinaNet from a torchvision one (weights, anchors and settings)."""

from __future__ import annotations

import torch
from torch import nn

from focaldet.errors import ConfigError
from focaldet.modeling.anchors import AnchorGenerator
from focaldet.modeling.backbone import ResNetBackbone
from focaldet.modeling.box_coder import BoxCoder
from focaldet.modeling.postprocess import PostProcess

_DEPTH_BY_BLOCKS = {(2, "BasicBlock"): 18, (6, "BasicBlock"): 34, (6, "Bottleneck"): 50, (23, "Bottleneck"): 101}


def _layers(module: nn.Module, types=(nn.Conv2d, nn.GroupNorm)) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, types)]


def _copy_pairs(src: list[nn.Module], dst: list[nn.Module], what: str) -> None:
    if [type(m) for m in src] != [type(m) for m in dst]:
        raise ConfigError(f"cannot map torchvision {what}: layers {[type(m).__name__ for m in src]} "
                          f"vs {[type(m).__name__ for m in dst]}")
    for s, d in zip(src, dst):
        d.load_state_dict(s.state_dict())


def retinanet_from_torchvision(cls, tv: nn.Module):
    """See ``RetinaNet.from_torchvision``."""
    body = tv.backbone.body
    depth = _DEPTH_BY_BLOCKS.get((len(body.layer3), type(body.layer3[0]).__name__))
    if depth is None:
        raise ConfigError("from_torchvision supports ResNet-18/34/50/101 backbones")
    gn_head = any(isinstance(m, nn.GroupNorm) for m in tv.head.classification_head.conv.modules())
    tvt, tva = tv.transform, tv.anchor_generator
    if len({tuple(r) for r in tva.aspect_ratios}) != 1:
        raise ConfigError("from_torchvision needs the same aspect ratios on every level")
    sizes = [s[0] for s in tva.sizes]
    scales = [2 ** (k / len(tva.sizes[0])) for k in range(len(tva.sizes[0]))]
    if tuple(tuple(int(x * s) for s in scales) for x in sizes) != tuple(tuple(s) for s in tva.sizes):
        raise ConfigError(f"from_torchvision expects octave-scaled anchor sizes, got {tva.sizes}")
    model = cls(
        num_classes=tv.head.classification_head.num_classes,
        backbone=ResNetBackbone(depth=depth, norm="frozen_bn", freeze_at=0),
        anchor_generator=AnchorGenerator(sizes=sizes, scales=scales, aspect_ratios=tva.aspect_ratios[0],
                                         torchvision_compat=True),
        box_coder=BoxCoder(tv.box_coder.weights, tv.box_coder.bbox_xform_clip),
        postprocess=PostProcess(tv.score_thresh, tv.topk_candidates, tv.nms_thresh, tv.detections_per_img),
        fpn_channels=tv.backbone.out_channels,
        p6_from="p5" if getattr(tv.backbone.fpn.extra_blocks, "use_P5", False) else "c5",
        num_convs=len(tv.head.classification_head.conv),
        head_norm="gn" if gn_head else None,
        pixel_mean=tvt.image_mean, pixel_std=tvt.image_std,
        min_size=int(tvt.min_size[-1]), max_size=int(tvt.max_size),
        size_divisibility=tvt.size_divisible,
    )
    # Backbone: same attribute names; BatchNorm2d statistics go into FrozenBatchNorm2d.
    state = {k: v for k, v in body.state_dict().items() if not k.endswith("num_batches_tracked")}
    model.backbone.load_state_dict(state)
    fpn = tv.backbone.fpn
    _copy_pairs([b[0] if isinstance(b, nn.Sequential) else b for b in fpn.inner_blocks], list(model.fpn.lateral), "FPN lateral convs")
    _copy_pairs([b[0] if isinstance(b, nn.Sequential) else b for b in fpn.layer_blocks], list(model.fpn.output), "FPN output convs")
    model.fpn.p6.load_state_dict(fpn.extra_blocks.p6.state_dict())
    model.fpn.p7.load_state_dict(fpn.extra_blocks.p7.state_dict())
    cls_head, reg_head = tv.head.classification_head, tv.head.regression_head
    _copy_pairs(_layers(cls_head.conv), _layers(model.head.cls_tower), "class tower")
    _copy_pairs(_layers(reg_head.conv), _layers(model.head.box_tower), "box tower")
    model.head.cls_logits.load_state_dict(cls_head.cls_logits.state_dict())
    model.head.bbox_pred.load_state_dict(reg_head.bbox_reg.state_dict())
    return model.to(next(tv.parameters()).device).eval()
