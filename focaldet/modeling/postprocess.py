"""From raw head outputs to final detections, batched over images."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from focaldet.modeling.box_coder import BoxCoder
from focaldet.structures.boxes import clip_boxes


class PostProcess:
    """Per level keep scores > ``score_thresh`` and the top ``topk_candidates``, decode only
    those, clip to the image, then class-aware NMS and ``detections_per_img`` per image.

    All images of the batch go through each step together: one ``topk`` per level, one
    decode, one ``torchvision.ops.batched_nms`` call keyed by (image, class).
    """

    def __init__(self, score_thresh: float = 0.05, topk_candidates: int = 1000, nms_thresh: float = 0.5,
                 detections_per_img: int = 100):
        self.score_thresh = score_thresh
        self.topk_candidates = topk_candidates
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img

    @torch.no_grad()
    def __call__(self, scores: Sequence[Tensor], box_deltas: Sequence[Tensor], anchors: Sequence[Tensor],
                 image_sizes: Tensor, box_coder: BoxCoder) -> list[dict[str, Tensor]]:
        """Detections of ``N`` images.

        Args:
            scores: per level ``(N, Ri, K)`` class probabilities.
            box_deltas: per level ``(N, Ri, 4)``.
            anchors: per level ``(Ri, 4)``.
            image_sizes: ``(N, 2)`` ``(h, w)`` of each image inside the padded batch.
        Returns:
            ``[{"boxes": (M, 4), "scores": (M,), "labels": (M,)}]`` with ``M <= detections_per_img``,
            in the batch's pixel coordinates, sorted by decreasing score.
        """
        n = image_sizes.shape[0]
        all_boxes, all_scores, all_labels = [], [], []
        for s, d, a in zip(scores, box_deltas, anchors):
            num_classes = s.shape[-1]
            flat = s.reshape(n, -1)  # (N, Ri, K) -> (N, Ri*K)
            k = min(self.topk_candidates, flat.shape[1])
            # The top k of the scores above the threshold are the top k of all scores that
            # pass it: one batched topk, threshold afterwards.
            top_scores, top_idx = flat.topk(k, dim=1, sorted=False)  # (N, k)
            anchor_idx = top_idx // num_classes
            deltas = d.gather(1, anchor_idx.unsqueeze(-1).expand(-1, -1, 4))  # (N, k, 4)
            all_boxes.append(box_coder.decode(deltas, a[anchor_idx]))  # (N, k, 4)
            all_scores.append(top_scores.float())
            all_labels.append(top_idx % num_classes)
        boxes = clip_boxes(torch.cat(all_boxes, 1), image_sizes)  # (N, M, 4)
        scores_ = torch.cat(all_scores, 1)  # (N, M)
        labels = torch.cat(all_labels, 1)
        image_idx = torch.arange(n, device=boxes.device)[:, None].expand_as(labels)

        keep = scores_ > self.score_thresh  # (N, M) -> flat selections (P,)
        boxes, scores_, labels, image_idx = boxes[keep], scores_[keep], labels[keep], image_idx[keep]
        # double: batched_nms may offset boxes by group id * max coordinate; fp64 keeps
        # those offsets exact for any number of (image, class) groups.
        groups = image_idx * (labels.max() + 1 if labels.numel() else 1) + labels
        kept = batched_nms(boxes.double(), scores_.double(), groups, self.nms_thresh)  # by decreasing score
        # top detections_per_img per image: stable sort by image keeps score order inside
        order = kept[torch.sort(image_idx[kept], stable=True).indices]
        counts = torch.bincount(image_idx[order], minlength=n)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(order.numel(), device=order.device) - torch.repeat_interleave(starts, counts)
        order = order[rank < self.detections_per_img]
        sizes = counts.clamp(max=self.detections_per_img).tolist()
        return [
            {"boxes": b, "scores": s, "labels": lab}
            for b, s, lab in zip(boxes[order].split(sizes), scores_[order].split(sizes), labels[order].split(sizes))
        ]

    def __repr__(self) -> str:
        return (f"PostProcess(score_thresh={self.score_thresh}, topk_candidates={self.topk_candidates}, "
                f"nms_thresh={self.nms_thresh}, detections_per_img={self.detections_per_img})")
