"""Build a focaldet RetinaNet from a torchvision one (weights, anchors and settings)."""

from __future__ import annotations

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


def retinanet_from_torchvision(cls, tv: nn.Module, **kwargs):
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
        size_divisibility=tvt.size_divisible, **kwargs,
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


def retinanet_to_torchvision(model: nn.Module, criterion: nn.Module | None = None) -> nn.Module:
    """See ``RetinaNet.to_torchvision``."""
    import torchvision
    from torchvision.models.detection import RetinaNet as TvRetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator as TvAnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.retinanet import RetinaNetHead as TvHead
    from torchvision.ops import FrozenBatchNorm2d
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    from focaldet.losses import GIoULoss, L1Loss, SigmoidFocalLoss, SmoothL1Loss

    body = model.backbone
    depth = _DEPTH_BY_BLOCKS.get((len(getattr(body, "layer3", ())), type(getattr(body, "layer3", [None])[0]).__name__))
    if depth is None or model.background_logit:
        raise ConfigError("to_torchvision supports ResNet-18/34/50/101 backbones and sigmoid class losses")
    norm = (FrozenBatchNorm2d if isinstance(body.bn1, FrozenBatchNorm2d)  # focaldet's is a subclass
            else nn.BatchNorm2d if type(body.bn1) is nn.BatchNorm2d else None)
    if norm is None:
        raise ConfigError(f"to_torchvision: torchvision's ResNet has no {type(body.bn1).__name__} backbone norm")
    if any(isinstance(m, nn.GroupNorm) for m in model.head.modules()):
        raise ConfigError("to_torchvision: use head_norm None (torchvision v1 head)")
    if criterion is not None:  # the loss settings torchvision's RetinaNet can express
        cls_loss, box_loss, matcher = criterion.cls_loss, criterion.box_loss, criterion.matcher
        if (type(cls_loss) is not SigmoidFocalLoss or (cls_loss.alpha, cls_loss.gamma) != (0.25, 2.0)
                or cls_loss.normalizer != "num_pos"):
            raise ConfigError("to_torchvision: torchvision's class loss is SigmoidFocalLoss(alpha=0.25, gamma=2)")
        box_type = {L1Loss: "l1", GIoULoss: "giou"}.get(type(box_loss))
        if type(box_loss) is SmoothL1Loss and box_loss.beta == 1.0:
            box_type = "smooth_l1"
        if box_type is None:
            raise ConfigError(f"to_torchvision: torchvision has no box loss like {box_loss!r} "
                              "(use L1Loss, GIoULoss or SmoothL1Loss(beta=1.0))")
        if (matcher.fg_iou_thresh, matcher.bg_iou_thresh, matcher.allow_low_quality_matches) != (0.5, 0.4, True):
            raise ConfigError("to_torchvision: torchvision's matcher is fixed at 0.5 / 0.4 with low-quality matches")
    resnet = getattr(torchvision.models, f"resnet{depth}")(weights=None, norm_layer=norm)
    c5 = body.out_channels[-1]
    fpn_channels = model.fpn.out_channels
    backbone = BackboneWithFPN(
        resnet, {"layer2": "0", "layer3": "1", "layer4": "2"}, list(body.out_channels), fpn_channels,
        # torchvision takes P6 from P5 exactly when C5 and P5 have the same channels
        extra_blocks=LastLevelP6P7(fpn_channels if model.fpn.p6_from == "p5" else c5, fpn_channels),
    )
    if (model.fpn.p6_from == "p5") != backbone.fpn.extra_blocks.use_P5:
        raise ConfigError(f"to_torchvision: torchvision cannot take P6 from {model.fpn.p6_from} here")
    ag = model.anchor_generator
    anchors = TvAnchorGenerator(tuple(tuple(s * k for k in ag.scales) for s in ag.sizes),
                                (tuple(ag.aspect_ratios),) * len(ag.sizes))
    head = TvHead(fpn_channels, ag.num_anchors, model.num_classes)
    num_convs = len(_layers(model.head.cls_tower))
    head.classification_head.conv = head.classification_head.conv[:num_convs]
    head.regression_head.conv = head.regression_head.conv[:num_convs]
    if criterion is not None:
        head.regression_head._loss_type = box_type
    pp = model.postprocess
    tv = TvRetinaNet(
        backbone, model.num_classes, min_size=model.min_size or 800, max_size=model.max_size or 1333,
        image_mean=model.pixel_mean.flatten().tolist(), image_std=model.pixel_std.flatten().tolist(),
        anchor_generator=anchors, head=head, score_thresh=pp.score_thresh, nms_thresh=pp.nms_thresh,
        detections_per_img=pp.detections_per_img, topk_candidates=pp.topk_candidates,
    )
    tv.transform.size_divisible = model.size_divisibility
    tv.transform._skip_resize = True  # training images come resized, as focaldet's (torchvision's references do this)
    tv.box_coder.weights, tv.box_coder.bbox_xform_clip = model.box_coder.weights, model.box_coder.scale_clamp
    # Same weights and the same frozen parameters, layer by layer.
    tv.backbone.body.load_state_dict(body.state_dict())  # same attribute names as torchvision's ResNet
    trainable = {name: p.requires_grad for name, p in body.named_parameters()}
    for name, p in tv.backbone.body.named_parameters():
        p.requires_grad_(trainable[name])
    fpn = tv.backbone.fpn
    _copy_pairs(list(model.fpn.lateral), [b[0] for b in fpn.inner_blocks], "FPN lateral convs")
    _copy_pairs(list(model.fpn.output), [b[0] for b in fpn.layer_blocks], "FPN output convs")
    fpn.extra_blocks.p6.load_state_dict(model.fpn.p6.state_dict())
    fpn.extra_blocks.p7.load_state_dict(model.fpn.p7.state_dict())
    _copy_pairs(_layers(model.head.cls_tower), _layers(head.classification_head.conv), "class tower")
    _copy_pairs(_layers(model.head.box_tower), _layers(head.regression_head.conv), "box tower")
    head.classification_head.cls_logits.load_state_dict(model.head.cls_logits.state_dict())
    head.regression_head.bbox_reg.load_state_dict(model.head.bbox_pred.state_dict())
    return tv.to(model.pixel_mean.device).train(model.training)
