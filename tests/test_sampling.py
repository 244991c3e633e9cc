"""Repeat-factor sampling: factors, epoch draws, DDP shares, the datamodule and the doctor."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
from torch.utils.data import DistributedSampler

from focaldet.data import CocoDataModule
from focaldet.data.doctor import check_dataset
from focaldet.data.sampling import (
    RepeatFactorSampler,
    class_repeat_factors,
    expected_class_frequency,
    repeat_factors,
)
from focaldet.errors import ConfigError

# 20 images: class 0 in all but two, class 1 in 4, class 2 in 1; two images without boxes.
TOY = [[0, 0]] * 14 + [[0, 1]] * 3 + [[1, 2, 2]] + [[]] * 2


def _direct(labels_per_image, t, rule):
    n = len(labels_per_image)
    out = []
    for labels in labels_per_image:
        best = 1.0
        for c in set(labels):
            f = sum(c in set(other) for other in labels_per_image) / n
            best = max(best, math.sqrt(t / f) if rule == "sqrt" else t / f, 1.0)
        out.append(best)
    return np.array(out)


@pytest.mark.parametrize("rule", ["sqrt", "linear"])
@pytest.mark.parametrize("t", [0.001, 0.3, 0.9])
def test_factors_match_formula(t, rule):
    np.testing.assert_allclose(repeat_factors(TOY, t, rule), _direct(TOY, t, rule))


def test_class_factors_and_expected_frequency():
    r_c = class_repeat_factors(TOY, 0.5, "sqrt")
    assert r_c == pytest.approx({0: 1.0, 1: math.sqrt(0.5 / 0.2), 2: math.sqrt(0.5 / 0.05)})
    plain = expected_class_frequency(TOY)
    assert plain[2] == (1.0, 1 / 20) and plain[1] == (4.0, 4 / 20)
    r = repeat_factors(TOY, 0.5, "sqrt")
    after = expected_class_frequency(TOY, r)
    assert after[2][0] == pytest.approx(math.sqrt(10))
    assert after[1][0] == pytest.approx(3 * math.sqrt(2.5) + math.sqrt(10))
    assert after[1][1] == pytest.approx(after[1][0] / r.sum())
    with pytest.raises(ConfigError, match="repeat_rule"):
        repeat_factors(TOY, 0.5, "cubic")
    with pytest.raises(ConfigError, match="repeat_threshold"):
        repeat_factors(TOY, 0.0)


def test_epoch_length_counts_and_determinism():
    r = repeat_factors(TOY, 0.5, "sqrt")
    sampler = RepeatFactorSampler(r, num_replicas=1, rank=0, seed=3)
    assert len(sampler) == math.ceil(r.sum())
    draws = [sampler.draw(e) for e in range(400)]
    assert np.mean([len(d) for d in draws]) == pytest.approx(r.sum(), abs=0.1)
    counts = Counter(i for d in draws for i in d.tolist())
    np.testing.assert_allclose([counts[i] / 400 for i in range(len(r))], r, atol=0.1)  # E[draws] = r_i
    for d in draws[:5]:  # stochastic rounding: floor(r) or ceil(r) copies
        c = Counter(d.tolist())
        assert all(math.floor(r[i]) <= c[i] <= math.ceil(r[i]) for i in range(len(r)))

    sampler.set_epoch(2)
    first = list(sampler)
    again = RepeatFactorSampler(r, num_replicas=1, rank=0, seed=3)
    again.set_epoch(2)
    assert list(again) == first and len(first) == len(sampler)
    again.set_epoch(3)
    assert list(again) != first
    other_seed = RepeatFactorSampler(r, num_replicas=1, rank=0, seed=4)
    other_seed.set_epoch(2)
    assert list(other_seed) != first


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_share_one_draw(world):
    r = repeat_factors(TOY, 0.5, "sqrt")
    samplers = [RepeatFactorSampler(r, num_replicas=world, rank=k, seed=0) for k in range(world)]
    for s in samplers:
        s.set_epoch(5)
    shares = [list(s) for s in samplers]
    assert len({len(x) for x in shares}) == 1 and len(shares[0]) == len(samplers[0])
    full = samplers[0].epoch_indices(5).tolist()
    assert len(full) == world * len(shares[0]) >= r.sum()
    interleaved = [shares[k][j] for j in range(len(shares[0])) for k in range(world)]
    assert interleaved == full  # disjoint positions, together the whole epoch
    draw = samplers[0].draw(5).tolist()
    n = min(len(draw), len(full))
    assert full[:n] == draw[:n]  # the epoch is the draw, trimmed or padded


def _dm(synth, **kwargs):
    return CocoDataModule(train_ann=str(synth.train_ann), train_images=str(synth.images), batch_size=2,
                          num_workers=0, min_size=64, max_size=128, **kwargs)


def test_datamodule_builds_the_sampler(synth_coco, monkeypatch):
    dm = _dm(synth_coco)
    dm.setup("fit")
    assert dm.train_sampler() is None and dm.train_dataloader().sampler.__class__.__name__ == "RandomSampler"

    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    dm = _dm(synth_coco, sampler="repeat_factor", repeat_threshold=0.9, repeat_rule="linear")
    dm.setup("fit")
    loader = dm.train_dataloader()
    sampler = loader.sampler
    assert isinstance(sampler, RepeatFactorSampler) and sampler.seed == 7
    assert isinstance(sampler, DistributedSampler)  # Lightning's use_distributed_sampler keeps it as is
    assert (sampler.num_replicas, sampler.rank) == (1, 0)
    labels = [r["labels"].tolist() for r in dm.datasets["train"].records]
    np.testing.assert_allclose(sampler.factors.numpy(), _direct(labels, 0.9, "linear"))
    assert len(loader) == math.ceil(len(sampler) / 2)
    with pytest.raises(ConfigError, match="data.sampler"):
        _dm(synth_coco, sampler="balanced")


def test_doctor_prints_frequencies(make_coco, tmp_path, capsys):
    from focaldet.data.cli import main

    cats = [{"id": 1, "name": "common"}, {"id": 5, "name": "rare"}]
    anns = [{"image_id": i, "category_id": 1, "bbox": [2, 2, 20, 20]} for i in range(1, 11)]
    anns.append({"image_id": 10, "category_id": 5, "bbox": [30, 10, 10, 12]})
    ann, images = make_coco(images=[(64, 48)] * 10, annotations=anns, categories=cats)
    report = check_dataset(ann, repeat_threshold=0.4)
    rows = {row["name"]: row for row in report.sampling}
    assert rows["rare"]["repeat_factor"] == pytest.approx(2.0)  # sqrt(0.4 / 0.1)
    assert rows["rare"]["images_per_epoch"] == pytest.approx(1) and rows["rare"]["share"] == pytest.approx(0.1)
    assert rows["rare"]["sampled_images_per_epoch"] == pytest.approx(2.0)
    assert rows["rare"]["sampled_share"] == pytest.approx(2 / 11)
    assert rows["common"]["sampled_share"] == pytest.approx(1.0)
    assert report.sampled_epoch_length == pytest.approx(11)

    out = tmp_path / "report.json"
    assert main(["check", str(ann), "--repeat-threshold", "0.4", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "repeat-factor sampling (t 0.4, sqrt rule)" in text
    assert "rare" in text and "18.2%" in text and "10.0%" in text
    assert json.loads(out.read_text())["sampling"][1]["sampled_images_per_epoch"] == pytest.approx(2.0)
    assert "repeat-factor" not in check_dataset(ann).format()
