"""RetinaNet (Lin et al., 2017): ResNet + FPN (P3-P7), 9 anchors per location, shared
class and box subnets. The model alone runs without Lightning."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from focaldet.config.inputs import InputSettings, shortest_edge_scale
from focaldet.modeling.anchors import AnchorGenerator
from focaldet.modeling.backbone import ResNetBackbone, fuse_frozen_batchnorm
from focaldet.modeling.box_coder import BoxCoder
from focaldet.modeling.fpn import FPN
from focaldet.modeling.head import RetinaNetHead
from focaldet.modeling.postprocess import PostProcess
from focaldet.structures.boxes import rescale_boxes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RetinaNet(nn.Module):
    """RetinaNet detector.

    Args:
        num_classes: number of object classes ``K`` (contiguous labels ``0..K-1``).
        backbone: a module returning ``[C3, C4, C5]`` with an ``out_channels`` attribute;
            default ``ResNetBackbone(depth=50)`` (frozen BN, stem and stage 1 frozen).
        anchor_generator: default ``AnchorGenerator()`` (32-512 px on P3-P7, 9 per location).
        box_coder: default ``BoxCoder()`` (weights 1, dw/dh clamped at log(1000/16)).
        postprocess: default ``PostProcess()`` (score > 0.05, top 1000 per level, NMS 0.5, 100 per image).
        fpn_channels: channels of P3-P7 and of the heads.
        p6_from: ``"c5"`` (paper, detectron2) or ``"p5"`` (torchvision v1).
        num_convs, head_norm, prior_prob: see ``RetinaNetHead``.
        background_logit: add a background logit per anchor (for softmax losses).
        pixel_mean, pixel_std: input normalisation, for images in [0, 1].
        min_size, max_size: ``predict`` resizes the shorter side to ``min_size`` and caps
            the longer side at ``max_size`` (torchvision's resize); ``None`` keeps the size.
        size_divisibility: ``predict`` pads batches to a multiple of this.
            Defaults: `InputSettings`'s; ``RetinaNetModule`` passes the data's eval settings
            (``InputSettings.predict_args()``), so ``predict`` runs at the trained size.
        channels_last: keep weights and activations in NHWC memory order (``torch.channels_last``),
            which oneDNN (CPU) and cuDNN (tensor cores) run faster than NCHW; the data
            pipeline already delivers NHWC batches. Numerically the same model.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: nn.Module | None = None,
        anchor_generator: AnchorGenerator | None = None,
        box_coder: BoxCoder | None = None,
        postprocess: PostProcess | None = None,
        fpn_channels: int = 256,
        p6_from: str = "c5",
        num_convs: int = 4,
        head_norm: str | None = None,
        prior_prob: float = 0.01,
        background_logit: bool = False,
        pixel_mean: Sequence[float] = IMAGENET_MEAN,
        pixel_std: Sequence[float] = IMAGENET_STD,
        min_size: int | None = InputSettings.min_size,
        max_size: int | None = InputSettings.max_size,
        size_divisibility: int = InputSettings.size_divisibility,
        channels_last: bool = True,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.backbone = backbone if backbone is not None else ResNetBackbone()
        self.fpn = FPN(self.backbone.out_channels, fpn_channels, p6_from)
        self.anchor_generator = anchor_generator if anchor_generator is not None else AnchorGenerator()
        self.box_coder = box_coder if box_coder is not None else BoxCoder()
        self.postprocess = postprocess if postprocess is not None else PostProcess()
        self.background_logit = background_logit
        self.head = RetinaNetHead(
            fpn_channels, self.anchor_generator.num_anchors, num_classes + int(background_logit),
            num_convs=num_convs, norm=head_norm, prior_prob=prior_prob, background_logit=background_logit,
        )
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), persistent=False)
        self.min_size, self.max_size = min_size, max_size
        self.size_divisibility = size_divisibility
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.to(memory_format=self.memory_format)

    @property
    def inputs(self) -> InputSettings:
        """The resize and padding ``predict`` applies (the exporters read these too)."""
        return InputSettings(self.min_size, self.max_size, self.size_divisibility)

    # ------------------------------------------------------------------ training path
    def normalize(self, images: Tensor, image_sizes: Tensor | None = None) -> Tensor:
        """Padded batch ``(N, 3, H, W)`` (uint8 in [0, 255] or float in [0, 1]) -> normalised
        float; the padding right/below each ``image_sizes (N, 2)`` extent is set to 0."""
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        x = (x - self.pixel_mean) / self.pixel_std
        if image_sizes is not None:
            n, _, h, w = x.shape
            rows = torch.arange(h, device=x.device).view(1, h, 1) < image_sizes[:, 0].view(n, 1, 1)
            cols = torch.arange(w, device=x.device).view(1, 1, w) < image_sizes[:, 1].view(n, 1, 1)
            x = x * (rows & cols).unsqueeze(1)  # (N, 1, H, W) mask
        return x

    def forward(self, x: Tensor) -> dict:
        """Raw outputs for a normalised padded batch ``x (N, 3, H, W)``.

        Returns a dict with ``cls_logits``: per level ``(N, Hi*Wi*A, C)``, ``box_deltas``:
        per level ``(N, Hi*Wi*A, 4)``, ``anchors``: ``(R, 4)`` for all levels, R = sum Hi*Wi*A,
        and ``anchor_grids``: the same anchors as one ``AnchorGrid`` per level (for the matcher).
        """
        x = x.contiguous(memory_format=self.memory_format)  # a no-op for the data pipeline's NHWC batches
        features = self.fpn(self.backbone(x))
        cls_logits, box_deltas = self.head(features)
        shapes = [f.shape[-2:] for f in features]
        anchors, grids = self.anchor_generator.anchors_and_grids(shapes, x.device, image_size=x.shape[-2:])
        return {"cls_logits": cls_logits, "box_deltas": box_deltas, "anchors": anchors, "anchor_grids": grids}

    def scores(self, cls_logits: Tensor) -> Tensor:
        """Class probabilities ``(..., K)`` from logits ``(..., C)``."""
        if self.background_logit:
            return cls_logits.float().softmax(-1)[..., :-1]
        return cls_logits.float().sigmoid()

    def detect(self, outputs: dict, image_sizes: Tensor) -> list[dict[str, Tensor]]:
        """Detections in the batch's pixel coordinates from ``forward``'s outputs."""
        counts = [t.shape[1] for t in outputs["box_deltas"]]
        anchors = outputs["anchors"].split(counts)
        if self.background_logit:
            scores = [self.scores(t) for t in outputs["cls_logits"]]
            return self.postprocess(scores, outputs["box_deltas"], anchors, image_sizes, self.box_coder)
        # sigmoid is increasing: select the top-k on the logits, squash only the selected
        return self.postprocess(outputs["cls_logits"], outputs["box_deltas"], anchors, image_sizes,
                                self.box_coder, score_fn=torch.sigmoid)

    # ------------------------------------------------------------------ inference on raw images
    def _resize(self, image: Tensor) -> Tensor:
        """torchvision's GeneralizedRCNNTransform resize: focaldet's `shortest_edge_scale`,
        applied as torchvision does (bilinear on floats, sizes floored), for bit-equal parity
        with torchvision's RetinaNet. focaldet's own doors prepare images with
        `focaldet.inference.Predictor` instead."""
        if self.min_size is None:
            return image
        scale = shortest_edge_scale(*image.shape[-2:], self.min_size, self.max_size)
        if scale == 1.0:  # bilinear at scale 1 samples every pixel centre: the identity
            return image
        return F.interpolate(image[None], scale_factor=scale, mode="bilinear",
                             recompute_scale_factor=True, align_corners=False)[0]

    @torch.inference_mode()
    def predict(self, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        """Detect objects in ``images``: a list of ``(3, Hi, Wi)`` float tensors in [0, 1].

        Returns ``[{"boxes": (M, 4) xyxy, "scores": (M,), "labels": (M,)}]`` in each input
        image's own pixel coordinates.
        """
        device = self.pixel_mean.device
        resized = [self._resize(((img.to(device) - self.pixel_mean[0]) / self.pixel_std[0])) for img in images]
        sizes = torch.tensor([im.shape[-2:] for im in resized], device=device)  # (N, 2)
        d = self.size_divisibility
        h = math.ceil(int(sizes[:, 0].max()) / d) * d
        w = math.ceil(int(sizes[:, 1].max()) / d) * d
        batch = torch.empty((len(resized), 3, h, w), device=device, memory_format=self.memory_format).zero_()
        for i, im in enumerate(resized):  # one copy per image, into the model's layout
            batch[i, :, : im.shape[-2], : im.shape[-1]] = im
        detections = self.detect(self(batch), sizes)
        for det, size, img in zip(detections, sizes.tolist(), images):
            det["boxes"] = rescale_boxes(det["boxes"], size, img.shape[-2:])
        return detections

    def fuse_batchnorm(self) -> RetinaNet:
        """Fold the frozen BatchNorms into the convolutions before them, for inference
        (`fuse_frozen_batchnorm`): same detections to float rounding, ~7 % faster on CPU.
        In place, returns ``self``; the state dict changes, so load weights first."""
        if fuse_frozen_batchnorm(self):
            self.to(memory_format=self.memory_format)  # the folded weights in the model's layout
        return self

    # ------------------------------------------------------------------ interop
    @classmethod
    def from_torchvision(cls, tv_model: nn.Module, **kwargs) -> RetinaNet:
        """A focaldet RetinaNet equal to a ``torchvision.models.detection.RetinaNet``
        (v1, ``retinanet_resnet50_fpn``): weights, anchors, normalisation and inference
        settings are copied, so both return the same detections on the same images
        (bit-equal with ``channels_last=False``; NHWC convolutions round differently).
        ``kwargs`` go to the constructor (e.g. ``channels_last``)."""
        from focaldet.modeling.interop import retinanet_from_torchvision

        return retinanet_from_torchvision(cls, tv_model, **kwargs)

    def to_torchvision(self, criterion: nn.Module | None = None) -> nn.Module:
        """The same detector as a ``torchvision.models.detection.RetinaNet``: same backbone,
        FPN, head depth, anchors, box coder, inference settings and weights (frozen layers
        stay frozen), built from torchvision's own classes. Like focaldet's, it does not
        resize training images (torchvision's ``_skip_resize``); ``predict``-style inference
        resizes to ``min_size``/``max_size`` as ``RetinaNet.predict`` does. With a ``RetinaNetCriterion``
        its box loss is set to match (``L1Loss``, ``GIoULoss`` or ``SmoothL1Loss(beta=1)``);
        what torchvision cannot express raises ``ConfigError``. Used for equal-budget
        comparisons (``focaldet equal-budget``)."""
        from focaldet.modeling.interop import retinanet_to_torchvision

        return retinanet_to_torchvision(self, criterion)
