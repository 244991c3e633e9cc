"""From raw head outputs to final detections, batched over images."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torchvision.ops import batched_nms, nms

from focaldet.modeling.box_coder import BoxCoder
from focaldet.structures.boxes import clip_boxes


def grouped_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """``torchvision.ops.batched_nms`` (same result) for the many (image, class) groups of a batch.

    On CPU, where ``batched_nms`` loops over the groups and scans all boxes for each one
    (``O(groups x boxes)``), the boxes are sorted by group once and ``nms`` runs on each
    contiguous run. Elsewhere ``batched_nms`` itself, in fp64 so that its per-group
    coordinate offsets stay exact for any number of groups.

    Returns the indices of the kept boxes by decreasing score.
    """
    if boxes.device.type != "cpu":
        return batched_nms(boxes.double(), scores.double(), groups, iou_threshold)
    order = torch.sort(groups, stable=True).indices
    counts = torch.unique_consecutive(groups[order], return_counts=True)[1].tolist()
    sorted_boxes, sorted_scores = boxes[order], scores[order]
    kept, start = [], 0
    for count in counts:  # each group is a contiguous run: views, no per-group scan
        run = slice(start, start + count)
        kept.append(nms(sorted_boxes[run], sorted_scores[run], iou_threshold) + start if count > 1
                    else order.new_tensor([start]))
        start += count
    kept = order[torch.cat(kept)].sort().values if kept else order
    return kept[scores[kept].sort(descending=True).indices]  # exactly as batched_nms orders them


class PostProcess:
    """Per level keep scores > ``score_thresh`` and the top ``topk_candidates``, decode only
    those, clip to the image, then class-aware NMS and ``detections_per_img`` per image.

    All images of the batch go through each step together: one top-k per level (over the
    best anchors only, see ``_topk``), one decode, one class-aware NMS (``grouped_nms``)
    keyed by (image, class).
    """

    def __init__(self, score_thresh: float = 0.05, topk_candidates: int = 1000, nms_thresh: float = 0.5,
                 detections_per_img: int = 100):
        self.score_thresh = score_thresh
        self.topk_candidates = topk_candidates
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img

    @torch.no_grad()
    def __call__(self, scores: Sequence[Tensor], box_deltas: Sequence[Tensor], anchors: Sequence[Tensor],
                 image_sizes: Tensor, box_coder: BoxCoder,
                 score_fn: Callable[[Tensor], Tensor] | None = None) -> list[dict[str, Tensor]]:
        """Detections of ``N`` images.

        Args:
            scores: per level ``(N, Ri, K)`` class probabilities.
            box_deltas: per level ``(N, Ri, 4)``.
            anchors: per level ``(Ri, 4)``.
            image_sizes: ``(N, 2)`` ``(h, w)`` of each image inside the padded batch.
            score_fn: if given, ``scores`` are raw scores (e.g. logits) and ``score_fn`` an
                elementwise increasing map to probabilities (e.g. ``torch.sigmoid``), applied
                to the selected top-k candidates only instead of to all ``N * R * K`` scores.
        Returns:
            ``[{"boxes": (M, 4), "scores": (M,), "labels": (M,)}]`` with ``M <= detections_per_img``,
            in the batch's pixel coordinates, sorted by decreasing score.
        """
        n = image_sizes.shape[0]
        all_boxes, all_scores, all_labels = [], [], []
        for s, d, a in zip(scores, box_deltas, anchors):
            # The top k of the scores above the threshold are the top k of all scores that
            # pass it: top-k first, threshold afterwards.
            top_scores, anchor_idx, labels = self._topk(s)  # (N, k) each
            deltas = d.gather(1, anchor_idx.unsqueeze(-1).expand(-1, -1, 4))  # (N, k, 4)
            all_boxes.append(box_coder.decode(deltas, a[anchor_idx]))  # (N, k, 4)
            top_scores = top_scores.float()
            all_scores.append(score_fn(top_scores) if score_fn is not None else top_scores)
            all_labels.append(labels)
        boxes = clip_boxes(torch.cat(all_boxes, 1), image_sizes)  # (N, M, 4)
        scores_ = torch.cat(all_scores, 1)  # (N, M)
        labels = torch.cat(all_labels, 1)
        image_idx = torch.arange(n, device=boxes.device)[:, None].expand_as(labels)

        keep = scores_ > self.score_thresh  # (N, M) -> flat selections (P,)
        boxes, scores_, labels, image_idx = boxes[keep], scores_[keep], labels[keep], image_idx[keep]
        groups = image_idx * (labels.max() + 1 if labels.numel() else 1) + labels
        kept = grouped_nms(boxes, scores_, groups, self.nms_thresh)  # by decreasing score
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

    def _topk(self, scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The ``topk_candidates`` best (anchor, class) pairs of each image of ``scores (N, R, K)``:
        ``(scores, anchor index, class)``, each ``(N, k)``, in no particular order.

        The top k pairs lie among the k anchors whose best class scores highest (any other
        anchor is beaten by k pairs), so those anchors are found first (a max over classes
        and a top-k over R) and the final top-k runs over their k * K scores only, instead
        of over all R * K.
        """
        n, r, num_classes = scores.shape
        k = min(self.topk_candidates, r * num_classes)
        if r <= k:  # few anchors: every anchor is a candidate
            top_scores, top_idx = scores.reshape(n, -1).topk(k, dim=1, sorted=False)
            return top_scores, top_idx // num_classes, top_idx % num_classes
        anchors = scores.amax(dim=2).topk(k, dim=1, sorted=False).indices  # (N, k)
        candidates = scores.gather(1, anchors.unsqueeze(-1).expand(-1, -1, num_classes))  # (N, k, K)
        top_scores, top_idx = candidates.reshape(n, -1).topk(k, dim=1, sorted=False)
        return top_scores, anchors.gather(1, top_idx // num_classes), top_idx % num_classes

    def __repr__(self) -> str:
        return (f"PostProcess(score_thresh={self.score_thresh}, topk_candidates={self.topk_candidates}, "
                f"nms_thresh={self.nms_thresh}, detections_per_img={self.detections_per_img})")
