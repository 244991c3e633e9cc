"""RetinaNet's training criterion: matching, targets, both losses and the normaliser."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from focaldet.losses.box import SmoothL1Loss
from focaldet.losses.focal import SigmoidFocalLoss
from focaldet.modeling.box_coder import BoxCoder
from focaldet.modeling.matcher import FOREGROUND, Matcher


def _world_mean(x: Tensor) -> Tensor:
    """Mean of ``x`` over all processes (``x`` itself outside distributed runs)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


class RetinaNetCriterion(nn.Module):
    """Assigns anchors to ground truth and computes ``loss_cls`` and ``loss_box``, each
    divided by the number of positive anchors, averaged over processes and clamped >= 1.

    Averaging the count over processes makes DDP (which averages gradients) train exactly
    like one process with the whole global batch. Everything is batched over images.

    Args:
        cls_loss: a class loss (see ``focaldet.losses.focal``); default ``SigmoidFocalLoss()``.
        box_loss: a box loss (see ``focaldet.losses.box``); default ``SmoothL1Loss()``.
        matcher: default ``Matcher()`` (0.5 / 0.4, low-quality matches allowed).
        box_coder: must be the model's (``RetinaNet.box_coder``); default ``BoxCoder()``.
        cls_weight, box_weight: multipliers of the two losses in ``loss``.
        normalizer_momentum: if set (detectron2 uses 0.9), divide by an exponential moving
            average of the positive count, kept in the ``normalizer`` buffer (initial 100).
    """

    def __init__(self, cls_loss: nn.Module | None = None, box_loss: nn.Module | None = None,
                 matcher: Matcher | None = None, box_coder: BoxCoder | None = None,
                 cls_weight: float = 1.0, box_weight: float = 1.0, normalizer_momentum: float | None = None):
        super().__init__()
        self.cls_loss = cls_loss if cls_loss is not None else SigmoidFocalLoss()
        self.box_loss = box_loss if box_loss is not None else SmoothL1Loss()
        self.matcher = matcher if matcher is not None else Matcher()
        self.box_coder = box_coder if box_coder is not None else BoxCoder()
        self.cls_weight, self.box_weight = cls_weight, box_weight
        self.normalizer_momentum = normalizer_momentum
        self.register_buffer("normalizer", torch.tensor(100.0))

    def forward(self, outputs: dict, gt_boxes: Tensor, gt_labels: Tensor) -> dict[str, Tensor]:
        """Losses of one batch.

        Args:
            outputs: ``RetinaNet.forward``'s dict (per-level ``cls_logits (N, Ri, C)``,
                ``box_deltas (N, Ri, 4)``, ``anchors (R, 4)``, optionally ``anchor_grids``).
            gt_boxes: ``(N, G, 4)`` xyxy, padded. gt_labels: ``(N, G)`` in [0, K), -1 = padding.
        Returns:
            ``{"loss", "loss_cls", "loss_box", "num_pos"}``.
        """
        # Class logits stay per level (N, Ri, C): concatenating them would copy every logit
        # (31M at 512 px and 80 classes), and every class loss is a sum, so it is summed
        # level by level.
        cls_logits = outputs["cls_logits"]
        box_deltas = torch.cat(outputs["box_deltas"], dim=1)  # (N, R, 4)
        anchors = outputs["anchors"]  # (R, 4)
        num_classes = cls_logits[0].shape[-1] - int(getattr(self.cls_loss, "background_logit", False))

        matches = self.matcher(anchors, gt_boxes, gt_labels >= 0, grids=outputs.get("anchor_grids"))
        fg = matches.labels == FOREGROUND  # (N, R)
        # class target per anchor: matched gt's label on foreground, K (background) elsewhere
        if gt_labels.shape[1] > 0:
            matched_labels = gt_labels.gather(1, matches.gt_index)  # (N, R)
            cls_target = torch.where(fg, matched_labels, num_classes)
        else:
            cls_target = torch.full_like(matches.gt_index, num_classes)
        weight = (matches.labels >= 0).float()  # (N, R)

        num_pos = _world_mean(fg.sum().float())
        if self.normalizer_momentum is not None:
            if self.training:
                m = self.normalizer_momentum
                self.normalizer.copy_(m * self.normalizer + (1 - m) * num_pos)
            normalizer = self.normalizer.clamp(min=1.0)
        else:
            normalizer = num_pos.clamp(min=1.0)

        counts = [t.shape[1] for t in cls_logits]
        loss_cls = sum(self.cls_loss(x, t, w) for x, t, w in
                       zip(cls_logits, cls_target.split(counts, dim=1), weight.split(counts, dim=1)))
        loss_cls = loss_cls / normalizer

        n_idx, r_idx = fg.nonzero(as_tuple=True)  # (P,), (P,)
        pred = box_deltas[n_idx, r_idx]  # (P, 4)
        gt = gt_boxes[n_idx, matches.gt_index[n_idx, r_idx]]  # (P, 4)
        if self.box_loss.decoded_boxes:
            pred, target = self.box_coder.decode(pred, anchors[r_idx]), gt.float()
        else:
            target = self.box_coder.encode(anchors[r_idx], gt)
        loss_box = self.box_loss(pred, target) / normalizer

        loss = self.cls_weight * loss_cls + self.box_weight * loss_box
        return {"loss": loss, "loss_cls": loss_cls.detach(), "loss_box": loss_box.detach(), "num_pos": num_pos}
