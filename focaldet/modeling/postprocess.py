"""From raw head outputs to final detections, batched over images."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true
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
        boxes, scores_, labels = self.candidates(scores, box_deltas, anchors, image_sizes, box_coder, score_fn)
        n = image_sizes.shape[0]
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

    def candidates(self, scores: Sequence[Tensor], box_deltas: Sequence[Tensor], anchors: Sequence[Tensor],
                   image_sizes: Tensor, box_coder: BoxCoder,
                   score_fn: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The first half of both paths: per level the top ``topk_candidates`` (anchor, class)
        pairs of each image, decoded and clipped to the image (arguments as ``__call__``).

        Returns ``(boxes (N, M, 4), scores (N, M), labels (N, M))``, M = sum of the levels'
        k, not yet thresholded.
        """
        all_deltas, all_anchors, all_scores, all_labels = [], [], [], []
        for s, d, a in zip(scores, box_deltas, anchors):
            # The top k of the scores above the threshold are the top k of all scores that
            # pass it: top-k first, threshold afterwards.
            top_scores, anchor_idx, labels = self._topk(s)  # (N, k) each
            all_deltas.append(d.gather(1, anchor_idx.unsqueeze(-1).expand(-1, -1, 4)))  # (N, k, 4)
            all_anchors.append(a[anchor_idx])  # (N, k, 4)
            all_scores.append(top_scores)
            all_labels.append(labels)
        # one decode and one score map over every level's candidates (an exported graph then
        # holds one copy of each, not one per level)
        boxes = box_coder.decode(torch.cat(all_deltas, 1), torch.cat(all_anchors, 1))  # (N, M, 4)
        top_scores = torch.cat(all_scores, 1).float()  # (N, M)
        return (clip_boxes(boxes, image_sizes), score_fn(top_scores) if score_fn is not None else top_scores,
                torch.cat(all_labels, 1))

    @torch.no_grad()
    def padded(self, scores: Sequence[Tensor], box_deltas: Sequence[Tensor], anchors: Sequence[Tensor],
               image_sizes: Tensor, box_coder: BoxCoder,
               score_fn: Callable[[Tensor], Tensor] | None = None) -> dict[str, Tensor]:
        """The same detections as ``__call__`` in fixed-shape tensors, for export: no Python
        loop or branch that depends on the data, one ``torchvision.ops.nms`` with class-aware
        offsets (``batched_nms``'s coordinate trick) over the whole batch.

        Returns ``boxes (N, D, 4)``, ``scores (N, D)``, ``labels (N, D)`` (contiguous; -1 in
        padding) and ``num_detections (N,)``, D = ``detections_per_img``; each image's rows
        are sorted by decreasing score, rows past ``num_detections`` have score 0 and box 0.

        The offsets are computed in float32 (ONNX's NonMaxSuppression takes nothing else), as
        ``batched_nms`` does on a GPU: a pair of boxes whose IoU lies within ~1e-4 of
        ``nms_thresh`` may be decided differently from ``__call__``'s exact per-group NMS.
        """
        boxes, scores_, labels = self.candidates(scores, box_deltas, anchors, image_sizes, box_coder, score_fn)
        n, m = scores_.shape
        d = self.detections_per_img
        image_idx = torch.arange(n, device=boxes.device)[:, None].expand_as(labels)
        groups = (image_idx * (labels.max() + 1) + labels).reshape(-1)  # (N*M,) one per (image, class)
        flat_boxes, flat_scores = boxes.reshape(-1, 4), scores_.reshape(-1)  # (N, M, 4) -> (N*M, 4)
        # NMS over all N*M candidates, the threshold applied after: a candidate below it scores
        # lower than every one above it, so it never suppresses one (the kept set above the
        # threshold is the same), and no data-dependent size is fed to NMS: with a `nonzero`
        # first, torch.export specialised on the count and the saved program failed on images
        # with fewer than 2 candidates.
        # boxes are clipped to the image: groups * (max side + 1) keeps groups apart
        offsets = groups.to(boxes.dtype) * (image_sizes.max().to(boxes.dtype) + 1)  # (N*M,)
        kept = nms(flat_boxes + offsets[:, None], flat_scores, self.nms_thresh)
        final = torch.zeros_like(flat_scores).scatter(0, kept, flat_scores[kept])  # 0: suppressed
        final = torch.where(final > self.score_thresh, final, 0).reshape(n, m)  # (N*M,) -> (N, M)
        # D zero rows appended: the top-D exists even when an image has fewer than D candidates
        final = torch.cat([final, final.new_zeros(n, d)], 1)  # (N, M + D)
        top_scores, top_idx = final.topk(d, dim=1)  # (N, D), by decreasing score
        valid = top_scores > 0
        boxes = torch.cat([boxes, boxes.new_zeros(n, d, 4)], 1).gather(1, top_idx[..., None].expand(-1, -1, 4))
        labels = torch.cat([labels, labels.new_zeros(n, d)], 1).gather(1, top_idx)
        return {"boxes": boxes * valid[..., None], "scores": top_scores,
                "labels": torch.where(valid, labels, -1), "num_detections": valid.sum(1)}

    def _topk(self, scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The ``topk_candidates`` best (anchor, class) pairs of each image of ``scores (N, R, K)``:
        ``(scores, anchor index, class)``, each ``(N, k)``, in no particular order.

        The top k pairs lie among the k anchors whose best class scores highest (any other
        anchor is beaten by k pairs), so those anchors are found first (a max over classes
        and a top-k over R) and the final top-k runs over their k * K scores only, instead
        of over all R * K.
        """
        n, r, num_classes = scores.shape
        k = torch.sym_min(self.topk_candidates, r * num_classes)  # symbolic under torch.export
        if statically_known_true(r <= k):  # few anchors: every anchor is a candidate (r an int: a plain test)
            top_scores, top_idx = scores.reshape(n, -1).topk(k, dim=1, sorted=False)
            return top_scores, top_idx // num_classes, top_idx % num_classes
        # with a symbolic r (export), no branch on it: a = min(k, r) anchors, the same top k
        anchors = scores.amax(dim=2).topk(torch.sym_min(self.topk_candidates, r), dim=1, sorted=False).indices  # (N, a)
        candidates = scores.gather(1, anchors.unsqueeze(-1).expand(-1, -1, num_classes))  # (N, a, K)
        top_scores, top_idx = candidates.reshape(n, -1).topk(k, dim=1, sorted=False)  # (N, a*K) -> (N, k)
        return top_scores, anchors.gather(1, top_idx // num_classes), top_idx % num_classes

    def __repr__(self) -> str:
        return (f"PostProcess(score_thresh={self.score_thresh}, topk_candidates={self.topk_candidates}, "
                f"nms_thresh={self.nms_thresh}, detections_per_img={self.detections_per_img})")
