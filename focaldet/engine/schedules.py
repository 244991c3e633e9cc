"""The paper's learning-rate schedule as a PyTorch scheduler: linear warmup, then steps.

``RetinaNetModule(lr_scheduler=...)`` takes any ``torch.optim.lr_scheduler`` class (a config's
``model.lr_scheduler``); this one is the default and detectron2's ``WarmupMultiStepLR``
(Goyal et al. 2017 warmup; Lin et al. 2017: x0.1 at 60k and 80k of 90k iterations). The
module steps it every iteration. The linear scaling rule (the learning rate grows with the
global batch) is the module's ``base_batch_size``: it scales the optimiser's rate before
this schedule starts from it.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["WarmupMultiStepLR"]


class WarmupMultiStepLR(LambdaLR):
    """Learning rate ``lr x warmup(it) x gamma ** (number of milestones <= it)``.

    Args:
        optimizer: the optimiser whose rates it sets.
        warmup_iters: iterations of linear warmup (0: none).
        warmup_factor: the warmup starts at ``lr x warmup_factor``.
        milestones: iterations at which the rate is multiplied by ``gamma``.
        gamma: the decay factor.
    """

    def __init__(self, optimizer: Optimizer, warmup_iters: int = 1000, warmup_factor: float = 0.001,
                 milestones: Sequence[int] = (), gamma: float = 0.1, last_epoch: int = -1):
        self.warmup_iters, self.warmup_factor = int(warmup_iters), float(warmup_factor)
        self.milestones, self.gamma = sorted(int(m) for m in milestones), float(gamma)
        super().__init__(optimizer, self.factor, last_epoch)

    def factor(self, it: int) -> float:
        """The multiplier of the optimiser's rate at iteration ``it``."""
        warm = 1.0
        if it < self.warmup_iters:
            warm = self.warmup_factor + (1 - self.warmup_factor) * it / self.warmup_iters
        return warm * self.gamma ** sum(it >= m for m in self.milestones)

    def __repr__(self) -> str:
        return (f"WarmupMultiStepLR(warmup_iters={self.warmup_iters}, warmup_factor={self.warmup_factor:g}, "
                f"milestones={self.milestones}, gamma={self.gamma:g})")
