"""RetinaNet's training criterion: assignment (matching and targets), then both losses and
their normalisers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from focaldet.errors import ConfigError
from focaldet.losses.box import SmoothL1Loss
from focaldet.losses.focal import SigmoidFocalLoss
from focaldet.modeling.box_coder import BoxCoder
from focaldet.modeling.matcher import BACKGROUND, FOREGROUND, Matcher

CROWD_IOA_THRESHOLD = 0.5  # an anchor this much inside a crowd region is ignored (mmdetection's ignore_iof_thr)


def _world_mean(x: Tensor) -> Tensor:
    """Mean of ``x`` over all processes (``x`` itself outside distributed runs)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def paired_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of each box of ``a (P, 4)`` with the box of ``b (P, 4)`` in the same row, both xyxy: ``(P,)``."""
    lt, rb = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])  # (P, 2) each
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a + area_b - inter)


def anchor_crowd_ioa(anchors: Tensor, crowd_boxes: Tensor) -> Tensor:
    """Intersection over the ANCHOR's area of each anchor ``(R, 4)`` with each crowd box
    ``(N, C, 4)`` (xyxy; zero padding rows give 0): ``(N, R, C)``."""
    lt = torch.maximum(anchors[None, :, None, :2], crowd_boxes[:, None, :, :2])  # (N, R, C, 2)
    rb = torch.minimum(anchors[None, :, None, 2:], crowd_boxes[:, None, :, 2:])  # (N, R, C, 2)
    inter = (rb - lt).clamp(min=0).prod(-1)  # (N, R, C)
    area = ((anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])).clamp(min=1e-12)  # (R,)
    return inter / area[None, :, None]


@dataclass
class Targets:
    """What ``RetinaNetCriterion.assign`` gives the losses: per anchor ``(N, R)`` and per
    positive anchor ``(P, ...)``, P = number of positives in the batch."""

    cls_target: Tensor  # (N, R) int64 in [0, K]: the matched gt's label on positives, K elsewhere
    weight: Tensor  # (N, R) float: 0 for ignored anchors (IoU between the thresholds), 1 elsewhere
    fg: Tensor  # (N, R) bool: positive anchors
    gt_index: Tensor  # (N, R) int64: matched gt of each anchor (meaningful on positives)
    pos_image: Tensor  # (P,) image of each positive
    pos_anchor: Tensor  # (P,) anchor of each positive
    gt_boxes: Tensor  # (P, 4) xyxy: the matched gt box of each positive
    num_pos: Tensor  # () positives, averaged over processes


def _check_call(loss: nn.Module, name: str, args: tuple[str, ...]) -> None:
    """`ConfigError` (one line) when ``loss`` cannot be called as the criterion calls it, e.g.
    ``torch.nn.Identity`` as a class loss: said at construction, not as a traceback mid-step."""
    import inspect

    from focaldet.errors import ConfigError

    if not callable(loss):
        raise ConfigError(f"model.criterion.{name}: {type(loss).__qualname__} is not a loss module")
    try:
        inspect.signature(loss.forward).bind(*args)
    except TypeError:
        kind = "class loss(logits, labels, weight)" if name == "cls_loss" else "box loss(pred, target, weight=None)"
        raise ConfigError(f"model.criterion.{name}: {type(loss).__module__}.{type(loss).__qualname__} is not a {kind} "
                          "(see focaldet.losses)") from None
    except ValueError:  # no signature to inspect (a C function): let the call say
        pass


class RetinaNetCriterion(nn.Module):
    """Assigns anchors to ground truth (``assign``) and computes ``loss_cls`` and
    ``loss_box`` (``forward``). The box loss is divided by the number of positive anchors,
    averaged over processes and clamped >= 1; the class loss by the count its
    ``normalizer`` attribute names (``focaldet.losses.normalizer``; default the same).

    Averaging the counts over processes makes DDP (which averages gradients) train exactly
    like one process with the whole global batch. Everything is batched over images.

    What a class loss needs beyond ``(logits, labels, weight)`` it declares, and the
    criterion reads the declaration, never the loss's type: ``background_logit`` (a K + 1st
    logit), ``normalizer``, ``quality_targets`` (it is also given each anchor's detached
    IoU of its decoded box with its gt: computed only then). Likewise a box loss declares
    ``decoded_boxes``.

    Args:
        cls_loss: a class loss (see ``focaldet.losses``); default ``SigmoidFocalLoss()``.
        box_loss: a box loss (see ``focaldet.losses.box``); default ``SmoothL1Loss()``.
        matcher: default ``Matcher()`` (0.5 / 0.4, low-quality matches allowed).
        box_coder: must be the model's (``RetinaNet.box_coder``); default ``BoxCoder()``.
        cls_weight, box_weight: multipliers of the two losses in ``loss``.
        normalizer_momentum: if set (detectron2 uses 0.9), divide by an exponential moving
            average of the positive count, kept in the ``normalizer`` buffer (initial 100).
        crowd_ioa_threshold: a BACKGROUND anchor whose intersection with a crowd box, over
            the anchor's area, is >= this is ignored (weight 0); anchors matched to a real box
            stay positive. Used only when crowd boxes are given; ``None`` ignores them.
    """

    def __init__(self, cls_loss: nn.Module | None = None, box_loss: nn.Module | None = None,
                 matcher: Matcher | None = None, box_coder: BoxCoder | None = None,
                 cls_weight: float = 1.0, box_weight: float = 1.0, normalizer_momentum: float | None = None,
                 crowd_ioa_threshold: float | None = CROWD_IOA_THRESHOLD):
        super().__init__()
        if crowd_ioa_threshold is not None and not 0 < crowd_ioa_threshold <= 1:
            raise ConfigError(f"model.criterion.crowd_ioa_threshold must be in (0, 1] or null (off), got {crowd_ioa_threshold!r}")
        self.cls_loss = cls_loss if cls_loss is not None else SigmoidFocalLoss()
        self.box_loss = box_loss if box_loss is not None else SmoothL1Loss()
        quality = ("quality",) if getattr(self.cls_loss, "quality_targets", False) else ()
        _check_call(self.cls_loss, "cls_loss", ("logits", "labels", "weight", *quality))
        _check_call(self.box_loss, "box_loss", ("pred", "target"))
        self.matcher = matcher if matcher is not None else Matcher()
        self.box_coder = box_coder if box_coder is not None else BoxCoder()
        self.cls_weight, self.box_weight = cls_weight, box_weight
        self.normalizer_momentum = normalizer_momentum
        self.crowd_ioa_threshold = crowd_ioa_threshold
        self.register_buffer("normalizer", torch.tensor(100.0))

    def assign(self, outputs: dict, gt_boxes: Tensor, gt_labels: Tensor,
               crowd_boxes: Tensor | None = None) -> Targets:
        """Match the anchors to the ground truth: class targets, ignore weights, positives.

        Args: as ``forward``. Returns ``Targets``.
        """
        anchors = outputs["anchors"]  # (R, 4)
        num_classes = outputs["cls_logits"][0].shape[-1] - int(getattr(self.cls_loss, "background_logit", False))
        matches = self.matcher(anchors, gt_boxes, gt_labels >= 0, grids=outputs.get("anchor_grids"))
        fg = matches.labels == FOREGROUND  # (N, R)
        # class target per anchor: matched gt's label on foreground, K (background) elsewhere
        if gt_labels.shape[1] > 0:
            matched_labels = gt_labels.gather(1, matches.gt_index)  # (N, R)
            cls_target = torch.where(fg, matched_labels, num_classes)
        else:
            cls_target = torch.full_like(matches.gt_index, num_classes)
        weight = (matches.labels >= 0).float()  # (N, R)
        if crowd_boxes is not None and crowd_boxes.shape[1] > 0 and self.crowd_ioa_threshold is not None:
            # (no crowd, or crowd ignoring off: nothing computed)
            on_crowd = anchor_crowd_ioa(anchors, crowd_boxes.to(anchors.dtype)).amax(-1) >= self.crowd_ioa_threshold
            weight = weight.masked_fill(on_crowd & (matches.labels == BACKGROUND), 0.0)  # (N, R)
        n_idx, r_idx = fg.nonzero(as_tuple=True)  # (P,), (P,)
        return Targets(
            cls_target=cls_target, weight=weight, fg=fg, gt_index=matches.gt_index,
            pos_image=n_idx, pos_anchor=r_idx, gt_boxes=gt_boxes[n_idx, matches.gt_index[n_idx, r_idx]],
            num_pos=_world_mean(fg.sum().float()),
        )

    def _pos_normalizer(self, num_pos: Tensor) -> Tensor:
        """The paper's normaliser: positives (or their moving average), clamped >= 1."""
        if self.normalizer_momentum is None:
            return num_pos.clamp(min=1.0)
        if self.training:
            m = self.normalizer_momentum
            self.normalizer.copy_(m * self.normalizer + (1 - m) * num_pos)
        return self.normalizer.clamp(min=1.0)

    def _cls_normalizer(self, targets: Targets, num_logits: int, pos_normalizer: Tensor) -> Tensor:
        """What the class loss's sum is divided by: the count its ``normalizer`` names."""
        kind = getattr(self.cls_loss, "normalizer", "num_pos")
        if kind == "num_pos":
            return pos_normalizer
        w = targets.weight
        if kind == "num_samples":
            count = w.sum()
        elif kind == "num_logits":
            count = w.sum() * num_logits
        elif kind == "num_anchors":
            count = w.new_tensor(float(w.shape[1]))
        elif kind == "weighted_samples":
            count = (self.cls_loss.sample_weight(targets.cls_target, num_logits) * w).sum()
        else:
            raise ValueError(f"{type(self.cls_loss).__name__}: unknown normalizer {kind!r}")
        return _world_mean(count).clamp(min=torch.finfo(torch.float32).tiny)

    def forward(self, outputs: dict, gt_boxes: Tensor, gt_labels: Tensor,
                crowd_boxes: Tensor | None = None) -> dict[str, Tensor]:
        """Losses of one batch.

        Args:
            outputs: ``RetinaNet.forward``'s dict (per-level ``cls_logits (N, Ri, C)``,
                ``box_deltas (N, Ri, 4)``, ``anchors (R, 4)``, optionally ``anchor_grids``).
            gt_boxes: ``(N, G, 4)`` xyxy, padded. gt_labels: ``(N, G)`` in [0, K), -1 = padding.
            crowd_boxes: optional ``(N, C, 4)`` xyxy ``iscrowd`` regions, zero-padded.
        Returns:
            ``{"loss", "loss_cls", "loss_box", "num_pos"}``.
        """
        t = self.assign(outputs, gt_boxes, gt_labels, crowd_boxes)
        # Class logits stay per level (N, Ri, C): concatenating them would copy every logit
        # (31M at 512 px and 80 classes), and every class loss is a sum, so it is summed
        # level by level.
        cls_logits = outputs["cls_logits"]
        box_deltas = torch.cat(outputs["box_deltas"], dim=1)  # (N, R, 4)
        anchors = outputs["anchors"]  # (R, 4)
        pred = box_deltas[t.pos_image, t.pos_anchor]  # (P, 4) deltas of the positives
        wants_quality = bool(getattr(self.cls_loss, "quality_targets", False))
        pred_boxes = None
        if self.box_loss.decoded_boxes or wants_quality:
            pred_boxes = self.box_coder.decode(pred, anchors[t.pos_anchor])  # (P, 4) xyxy

        pos_normalizer = self._pos_normalizer(t.num_pos)
        counts = [x.shape[1] for x in cls_logits]
        per_level = [t.cls_target.split(counts, dim=1), t.weight.split(counts, dim=1)]
        if wants_quality:
            quality = torch.zeros_like(t.weight)  # (N, R): IoU on positives, 0 elsewhere
            quality[t.pos_image, t.pos_anchor] = paired_iou(pred_boxes.detach(), t.gt_boxes.float())
            per_level.append(quality.split(counts, dim=1))
        loss_cls = sum(self.cls_loss(x, *level) for x, *level in zip(cls_logits, *per_level))
        loss_cls = loss_cls / self._cls_normalizer(t, cls_logits[0].shape[-1], pos_normalizer)

        if self.box_loss.decoded_boxes:
            loss_box = self.box_loss(pred_boxes, t.gt_boxes.float())
        else:
            loss_box = self.box_loss(pred, self.box_coder.encode(anchors[t.pos_anchor], t.gt_boxes))
        loss_box = loss_box / pos_normalizer

        loss = self.cls_weight * loss_cls + self.box_weight * loss_box
        return {"loss": loss, "loss_cls": loss_cls.detach(), "loss_box": loss_box.detach(), "num_pos": t.num_pos}
