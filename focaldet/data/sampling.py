"""Repeat-factor sampling (LVIS, Gupta et al. 2019; detectron2's ``RepeatFactorTrainingSampler``).

Class ``c`` appears in a fraction ``f_c`` of the images. Its repeat factor is
``r_c = max(1, sqrt(t / f_c))`` (``rule="sqrt"``, LVIS / detectron2 default) or
``max(1, t / f_c)`` (``rule="linear"``, detectron2's ``sqrt=False``); an image's factor is
the max over its classes (1 for images without boxes). Each epoch, an image is drawn
``floor(r) + (u < frac(r))`` times (stochastic rounding, ``u`` uniform), from a generator
seeded with ``seed + epoch``: deterministic given the seed and the epoch. Under DDP each rank
takes every ``world_size``-th index of the same shuffled list (padded by wrapping to a
multiple of ``world_size``): disjoint positions that together cover the epoch.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch
from torch.utils.data import Sampler

REPEAT_THRESHOLD = 0.001  # LVIS / detectron2's default t
REPEAT_RULES = ("sqrt", "linear")


def repeat_factors(image_classes: Sequence[set[int]], threshold: float = REPEAT_THRESHOLD,
                   rule: str = "sqrt") -> torch.Tensor:
    """Per-image repeat factors ``(I,)`` float64 from each image's set of class labels."""
    if rule not in REPEAT_RULES:
        raise ValueError(f"repeat_rule {rule!r}: expected one of {', '.join(REPEAT_RULES)}")
    n = max(len(image_classes), 1)
    freq = Counter(c for cs in image_classes for c in set(cs))  # class -> images containing it
    cat_r = {}
    for c, k in freq.items():
        ratio = threshold / (k / n)
        cat_r[c] = max(1.0, math.sqrt(ratio) if rule == "sqrt" else ratio)
    return torch.tensor([max((cat_r[c] for c in cs), default=1.0) for cs in image_classes], dtype=torch.float64)


def epoch_indices(factors: torch.Tensor, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The image indices of one epoch after stochastic rounding (and shuffling), ``(M,)`` int64."""
    g = torch.Generator().manual_seed(seed + epoch)
    whole = factors.floor()
    reps = whole + (torch.rand(len(factors), generator=g, dtype=torch.float64) < factors - whole)
    idx = torch.repeat_interleave(torch.arange(len(factors)), reps.long())
    return idx[torch.randperm(len(idx), generator=g)] if shuffle else idx


class RepeatFactorSampler(Sampler[int]):
    """Rank-aware repeat-factor sampler; call ``set_epoch`` each epoch (Lightning does).

    Args:
        factors: per-image repeat factors (``repeat_factors``).
        seed: shared by all ranks. rank, world_size: this process's share (default from
            ``torch.distributed`` when initialised, else 0 / 1).
    """

    def __init__(self, factors: torch.Tensor, seed: int = 0, shuffle: bool = True,
                 rank: int | None = None, world_size: int | None = None):
        import torch.distributed as dist
        ddp = dist.is_available() and dist.is_initialized()
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if ddp else 1)
        self.rank = rank if rank is not None else (dist.get_rank() if ddp else 0)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, {self.world_size})")
        self.factors, self.seed, self.shuffle, self.epoch = factors, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _share(self) -> torch.Tensor:
        idx = epoch_indices(self.factors, self.seed, self.epoch, self.shuffle)
        total = math.ceil(len(idx) / self.world_size) * self.world_size
        idx = idx.repeat(math.ceil(total / max(len(idx), 1)))[:total]  # wrap-pad like DistributedSampler
        return idx[self.rank::self.world_size]

    def __iter__(self):
        return iter(self._share().tolist())

    def __len__(self) -> int:
        return len(self._share())


def expected_class_frequency(image_classes: Sequence[set[int]], factors: torch.Tensor | None = None) -> dict[int, tuple[float, float]]:
    """Per class: (expected images per epoch, share of the epoch's images); ``factors=None`` = plain shuffle."""
    f = factors.tolist() if factors is not None else [1.0] * len(image_classes)
    total = sum(f) or 1.0
    per = Counter()
    for cs, r in zip(image_classes, f):
        for c in set(cs):
            per[c] += r
    return {c: (per[c], per[c] / total) for c in sorted(per)}


def format_frequency_table(image_classes: Sequence[set[int]], factors: torch.Tensor, names: dict[int, str] | None = None) -> str:
    """Text table: per class, images per epoch and share before and after sampling."""
    before, after = expected_class_frequency(image_classes), expected_class_frequency(image_classes, factors)
    names = names or {}
    lines = [f"  {'class':<16}{'before':>10}{'share':>8}{'after':>10}{'share':>8}"]
    for c in before:
        lines.append(f"  {names.get(c, str(c)):<16}{before[c][0]:>10.1f}{before[c][1]:>8.1%}{after[c][0]:>10.1f}{after[c][1]:>8.1%}")
    lines.append(f"  images per epoch {len(image_classes)} -> {float(factors.sum()):.1f} (expected)")
    return "\n".join(lines)
