"""What the criterion divides a class loss's sum by: the loss declares it (``normalizer``).

Every class loss returns a SUM; ``RetinaNetCriterion`` divides it by the count the loss's
``normalizer`` attribute names, averaged over processes (like the paper's positive count).
This is how a "mean over samples" or another reduction of the wild fits the one contract:
the loss declares it, the criterion reads the declaration, never the loss's type.
"""

from __future__ import annotations

NORMALIZERS = {
    "num_pos": "positive anchors (the paper's; clamped >= 1, or its moving average)",
    "num_samples": "non-ignored anchors: a mean over samples (``loss.mean()`` of per-anchor losses)",
    "num_logits": "non-ignored anchors x logits per anchor: a mean over every element",
    "num_anchors": "anchors per image: ``(N, R, C) loss.mean(1).sum()``",
    "weighted_samples": "sum over non-ignored anchors of ``loss.sample_weight(labels, C)``: "
                        "the weighted mean of ``nn.CrossEntropyLoss(weight=...)``",
}


def check_normalizer(name: str) -> str:
    """``name`` if it is one of ``NORMALIZERS``, else a ``ValueError`` listing them."""
    if name not in NORMALIZERS:
        raise ValueError(f"unknown normalizer {name!r}: expected one of {', '.join(NORMALIZERS)}")
    return name
