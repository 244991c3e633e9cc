"""Studies of a trained model (``focaldet analyze ...``)."""

from focaldet.analysis.loss_distribution import (
    LossDistribution,
    collect_logits,
    cumulative_loss_curve,
    focal_loss_per_example,
    hardest_share,
    sample_curve,
)

__all__ = ["LossDistribution", "collect_logits", "cumulative_loss_curve", "focal_loss_per_example",
           "hardest_share", "sample_curve"]
