"""Repeat-factor sampling (LVIS, Gupta et al. 2019; detectron2's ``RepeatFactorTrainingSampler``).

Images of rare classes are shown more than once per epoch. With ``f_c`` the share of
training images that contain class ``c`` and ``t`` the threshold:

    sqrt rule   r_c = max(1, sqrt(t / f_c))      (LVIS, detectron2's default)
    linear rule r_c = max(1, t / f_c)            (detectron2's ``sqrt=False``)

and an image's factor is the largest ``r_c`` of its classes (1 for an image without boxes).
Each epoch an image with factor ``r`` is drawn ``floor(r) + (u < frac(r))`` times
(``u ~ U(0, 1)``, stochastic rounding), so an epoch holds ``sum(r)`` images on average.

`repeat_factors` and `expected_class_frequency` are pure functions (the data doctor prints the
latter); `RepeatFactorSampler` is the training sampler, rank-aware like ``DistributedSampler``.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler

from focaldet.errors import ConfigError

__all__ = [
    "REPEAT_RULES",
    "REPEAT_THRESHOLD",
    "RepeatFactorSampler",
    "class_repeat_factors",
    "expected_class_frequency",
    "image_frequency",
    "repeat_factors",
]

REPEAT_THRESHOLD = 0.001  # LVIS / detectron2's default ``t``
REPEAT_RULES = ("sqrt", "linear")

RepeatRule = Literal["sqrt", "linear"]


def _check(threshold: float, rule: str) -> None:
    if rule not in REPEAT_RULES:
        raise ConfigError(f"data.repeat_rule must be one of {list(REPEAT_RULES)}, got {rule!r}")
    if not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
        raise ConfigError(f"data.repeat_threshold must be in (0, 1], got {threshold!r}")


def image_frequency(image_labels: Sequence[Collection[int]]) -> dict[int, float]:
    """``f_c``: share of the images whose labels contain class ``c``, for every class present."""
    counts: dict[int, int] = {}
    for labels in image_labels:
        for c in set(int(x) for x in labels):
            counts[c] = counts.get(c, 0) + 1
    n = max(len(image_labels), 1)
    return {c: k / n for c, k in sorted(counts.items())}


def class_repeat_factors(
    image_labels: Sequence[Collection[int]], threshold: float = REPEAT_THRESHOLD, rule: RepeatRule = "sqrt"
) -> dict[int, float]:
    """``r_c`` of every class present in ``image_labels`` (one collection of labels per image)."""
    _check(threshold, rule)
    power = 0.5 if rule == "sqrt" else 1.0
    return {c: max(1.0, (threshold / f) ** power) for c, f in image_frequency(image_labels).items()}


def repeat_factors(
    image_labels: Sequence[Collection[int]], threshold: float = REPEAT_THRESHOLD, rule: RepeatRule = "sqrt"
) -> np.ndarray:
    """Per-image repeat factor ``(N,)`` float64: the largest ``r_c`` of its classes, 1 without boxes."""
    per_class = class_repeat_factors(image_labels, threshold, rule)
    return np.asarray([max((per_class[int(c)] for c in labels), default=1.0) for labels in image_labels],
                      dtype=np.float64)


def expected_class_frequency(
    image_labels: Sequence[Collection[int]], factors: Sequence[float] | np.ndarray | None = None
) -> dict[int, tuple[float, float]]:
    """Per class ``(images per epoch containing it, share of the epoch's images)``.

    ``factors=None`` is plain shuffling (each image once per epoch); with repeat factors these
    are expectations over the stochastic rounding: ``sum_i r_i [c in image i]`` and that over
    ``sum_i r_i``.
    """
    r = np.ones(len(image_labels)) if factors is None else np.asarray(factors, dtype=np.float64)
    if len(r) != len(image_labels):
        raise ValueError(f"{len(r)} factors for {len(image_labels)} images")
    total = float(r.sum()) or 1.0
    per_class: dict[int, float] = {}
    for labels, ri in zip(image_labels, r):
        for c in set(int(x) for x in labels):
            per_class[c] = per_class.get(c, 0.0) + float(ri)
    return {c: (v, v / total) for c, v in sorted(per_class.items())}


def _world() -> tuple[int, int]:
    """``(world size, rank)`` of the default process group, ``(1, 0)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class RepeatFactorSampler(DistributedSampler):
    """Training sampler drawing each image ``floor(r) + (u < frac(r))`` times per epoch, shuffled.

    Args:
        factors: per-image repeat factors ``(N,)`` (see `repeat_factors`), in dataset order.
        num_replicas, rank: the DDP world size and this process's rank (default: the process
            group's, ``1, 0`` without one), as for ``DistributedSampler``.
        seed: base seed; every rank must use the same one (Lightning's ``PL_GLOBAL_SEED``).

    Epoch ``e``'s draw depends only on ``seed + e`` (call `set_epoch`; Lightning does at the
    start of every epoch) and is the same on every rank. Its length varies with the rounding
    around ``sum(factors)``; it is trimmed or padded (with its own first indices) to the fixed
    ``total_size = ceil(sum(factors) / num_replicas) * num_replicas`` so that every epoch has
    the same number of steps, and rank ``k`` takes positions ``k, k + R, k + 2R, ...``.

    It is a ``DistributedSampler`` so that Lightning (``use_distributed_sampler``) leaves it as
    it is instead of wrapping it in a second, index-splitting sampler.
    """

    def __init__(
        self,
        factors: Sequence[float] | np.ndarray,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
    ) -> None:
        world, me = _world()
        num_replicas = world if num_replicas is None else num_replicas
        rank = me if rank is None else rank
        self.factors = torch.as_tensor(np.asarray(factors, dtype=np.float64))  # (N,)
        if self.factors.ndim != 1 or len(self.factors) == 0 or bool((self.factors < 1).any()):
            raise ValueError("repeat factors must be a non-empty 1-D sequence of values >= 1")
        super().__init__(range(len(self.factors)), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.num_samples = math.ceil(float(self.factors.sum()) / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def draw(self, epoch: int) -> torch.Tensor:
        """Epoch ``epoch``'s stochastically rounded, shuffled draw (variable length, all ranks)."""
        g = torch.Generator().manual_seed(self.seed + epoch)
        whole = self.factors.floor()
        reps = whole + (torch.rand(len(self.factors), generator=g, dtype=torch.float64) < self.factors - whole)
        indices = torch.repeat_interleave(torch.arange(len(self.factors)), reps.long())
        return indices[torch.randperm(len(indices), generator=g)]

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """`draw` trimmed or padded to ``total_size`` (what the ranks share out)."""
        indices = self.draw(epoch)
        if len(indices) < self.total_size:
            repeats = math.ceil(self.total_size / len(indices))
            indices = indices.repeat(repeats)
        return indices[: self.total_size]

    def __iter__(self):
        return iter(self.epoch_indices(self.epoch)[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples
