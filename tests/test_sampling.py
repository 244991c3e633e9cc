"""Repeat-factor sampling: LVIS factors, determinism, DDP shares, frequency table."""

import math

import pytest
import torch

from focaldet.data.sampling import (RepeatFactorSampler, epoch_indices, expected_class_frequency,
                                    format_frequency_table, repeat_factors)

# 10 images: class 0 in 8, class 1 in 2, class 2 in 1, one image empty
IMAGES = [{0}] * 6 + [{0, 1}, {0, 2}, {1}, set()]


def _direct(t, rule):
    f = {0: 0.8, 1: 0.2, 2: 0.1}
    rc = {c: max(1.0, math.sqrt(t / v) if rule == "sqrt" else t / v) for c, v in f.items()}
    return [max((rc[c] for c in cs), default=1.0) for cs in IMAGES]


@pytest.mark.parametrize("rule", ["sqrt", "linear"])
@pytest.mark.parametrize("t", [0.001, 0.3, 0.9])
def test_factors_match_lvis_formula(t, rule):
    assert torch.allclose(repeat_factors(IMAGES, t, rule), torch.tensor(_direct(t, rule), dtype=torch.float64))


def test_bad_rule():
    with pytest.raises(ValueError, match="repeat_rule"):
        repeat_factors(IMAGES, 0.1, "cube")


def test_deterministic_given_seed_and_epoch():
    r = repeat_factors(IMAGES, 0.9)
    assert torch.equal(epoch_indices(r, 3, 1), epoch_indices(r, 3, 1))
    assert not torch.equal(epoch_indices(r, 3, 1), epoch_indices(r, 3, 2))
    # stochastic rounding: mean count of each image over many epochs -> its factor
    counts = sum(torch.bincount(epoch_indices(r, 0, e, shuffle=False), minlength=len(IMAGES)) for e in range(2000))
    assert torch.allclose(counts.double() / 2000, r, atol=0.05)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_disjoint_and_covering(world):
    r = repeat_factors(IMAGES, 0.9)
    full = epoch_indices(r, 7, 4)
    shares = []
    for rank in range(world):
        s = RepeatFactorSampler(r, seed=7, rank=rank, world_size=world)
        s.set_epoch(4)
        shares.append(list(s))
    assert len({len(x) for x in shares}) == 1  # same number of samples on every rank
    pos = sorted(p for rank in range(world) for p in range(rank, len(shares[0]) * world, world))
    assert pos == list(range(len(shares[0]) * world))  # disjoint positions
    merged = [shares[p % world][p // world] for p in range(len(shares[0]) * world)]
    assert merged[:len(full)] == full.tolist()  # together exactly the epoch (then wrap padding)


def test_expected_frequency_printed():
    r = repeat_factors(IMAGES, 0.9)
    after = expected_class_frequency(IMAGES, r)
    assert after[2][0] == pytest.approx(r[7].item())
    assert expected_class_frequency(IMAGES)[0] == (8, 0.8)
    table = format_frequency_table(IMAGES, r, {0: "RBC", 1: "WBC", 2: "Platelets"})
    assert "Platelets" in table and "80.0%" in table
