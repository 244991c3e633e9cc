"""``focaldet data split``: exact split sizes, no image in two splits, classes stratified."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from focaldet.data.cli import main as data_main
from focaldet.data.split import split_coco
from focaldet.errors import ConfigError, DataError


def _coco(num_images: int = 200, seed: int = 0) -> dict:
    """Images with 1-3 boxes of 4 classes of very different frequency (0: common ... 3: rare),
    10 images without boxes, and one image holding the only box of class 4."""
    rng = random.Random(seed)
    images, anns = [], []
    for i in range(1, num_images + 1):
        images.append({"id": i, "file_name": f"{i}.jpg", "height": 100, "width": 100})
        if i <= 10:
            continue
        for _ in range(rng.randint(1, 3)):
            cat = rng.choices([1, 2, 3, 4], weights=[60, 25, 10, 5])[0]
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat, "bbox": [10, 10, 20, 20],
                         "area": 400, "iscrowd": 0})
    anns.append({"id": len(anns) + 1, "image_id": num_images, "category_id": 5, "bbox": [1, 1, 5, 5],
                 "area": 25, "iscrowd": 0})
    cats = [{"id": c, "name": f"c{c}"} for c in range(1, 6)]
    return {"info": {"description": "t"}, "images": images, "annotations": anns, "categories": cats}


def _images_with(part: dict, cat: int) -> int:
    return len({a["image_id"] for a in part["annotations"] if a["category_id"] == cat})


def test_split_sizes_disjoint_and_complete():
    data = _coco()
    parts = split_coco(data, val=0.2, test=0.1, seed=0)
    assert [len(parts[s]["images"]) for s in ("train", "val", "test")] == [140, 40, 20]
    ids = [img["id"] for s in parts for img in parts[s]["images"]]
    assert sorted(ids) == list(range(1, 201))  # every image once
    for split, part in parts.items():  # annotations follow their image, nothing lost
        own = {img["id"] for img in part["images"]}
        assert all(a["image_id"] in own for a in part["annotations"])
        assert part["categories"] == data["categories"] and part["info"] == data["info"]
    assert sum(len(p["annotations"]) for p in parts.values()) == len(data["annotations"])


def test_split_is_stratified_by_class():
    data = _coco(400)
    parts = split_coco(data, val=0.2, test=0.1, seed=3)
    for cat in (1, 2, 3, 4):
        total = _images_with(data, cat)
        for split, share in (("val", 0.2), ("test", 0.1)):
            # each class's images are within ~2 images + 3 % of the asked share of that class
            assert abs(_images_with(parts[split], cat) - share * total) <= 2 + 0.03 * total, (cat, split)
    # the images without boxes are split like the rest: 10 -> 7 / 2 / 1
    empty = {s: sum(1 for img in p["images"] if img["id"] <= 10) for s, p in parts.items()}
    assert empty == {"train": 7, "val": 2, "test": 1}
    # a class with a single image stays in train
    assert _images_with(parts["train"], 5) == 1


def test_stratified_beats_random_on_a_rare_class():
    """The rare class's val share: stratified hits it; a plain shuffle of the same sizes misses
    it by more on average (numbers on 30 seeds)."""
    data = _coco(300)
    total = _images_with(data, 4)
    strat, plain = [], []
    for seed in range(30):
        parts = split_coco(data, val=0.2, seed=seed)
        strat.append(abs(_images_with(parts["val"], 4) - 0.2 * total))
        ids = [img["id"] for img in data["images"]]
        random.Random(seed).shuffle(ids)
        val = set(ids[:60])
        plain.append(abs(len({a["image_id"] for a in data["annotations"]
                              if a["category_id"] == 4 and a["image_id"] in val}) - 0.2 * total))
    assert max(strat) <= 1.5
    assert sum(strat) / 30 < sum(plain) / 30


def test_split_is_deterministic_per_seed():
    data = _coco()
    ids = lambda parts: [img["id"] for img in parts["val"]["images"]]  # noqa: E731
    assert ids(split_coco(data, 0.2, seed=1)) == ids(split_coco(data, 0.2, seed=1))
    assert ids(split_coco(data, 0.2, seed=1)) != ids(split_coco(data, 0.2, seed=2))
    assert "test" not in split_coco(data, 0.2)


def test_split_refuses_bad_fractions_and_tiny_files():
    data = _coco()
    with pytest.raises(ConfigError, match="leaves no image for train"):
        split_coco(data, 0.6, 0.4)
    with pytest.raises(ConfigError, match="--val must be a fraction"):
        split_coco(data, 1.5)
    with pytest.raises(DataError, match="too few"):
        split_coco({**data, "images": data["images"][:2], "annotations": []}, 0.1)
    bad = {**data, "annotations": [{**data["annotations"][0], "image_id": 9999}]}
    with pytest.raises(DataError, match="mine.json"):
        split_coco(bad, 0.2, source="mine.json")


def test_cli_writes_the_splits(tmp_path, capsys):
    ann = tmp_path / "all.json"
    ann.write_text(json.dumps(_coco()))
    assert data_main(["split", str(ann), "--val", "0.2", "--test", "0.1", "--seed", "0", "--out",
                      str(tmp_path / "splits")]) == 0
    out = capsys.readouterr().out
    assert "images                     140        40        20" in out
    written = {s: json.loads((tmp_path / "splits" / f"{s}.json").read_text()) for s in ("train", "val", "test")}
    assert written == split_coco(_coco(), 0.2, 0.1, seed=0)
    assert data_main(["split", str(tmp_path / "nope.json"), "--val", "0.2", "--out", str(tmp_path / "x")]) == 1
    assert "nope.json: annotation file not found" in capsys.readouterr().err


def test_split_bccd(bccd_dir, tmp_path):
    """BCCD's train JSON (205 images, 3 classes): 144 / 41 / 20 images, each class's boxes
    within 3 points of 70 / 20 / 10 %."""
    ann = bccd_dir / "annotations" / "instances_train.json"
    parts = split_coco(json.loads(ann.read_text()), 0.2, 0.1, seed=0)
    assert [len(parts[s]["images"]) for s in ("train", "val", "test")] == [144, 41, 20]
    totals = Counter(a["category_id"] for p in parts.values() for a in p["annotations"])
    for split, share in (("train", 0.7), ("val", 0.2), ("test", 0.1)):
        counts = Counter(a["category_id"] for a in parts[split]["annotations"])
        for cat, total in totals.items():
            assert abs(counts[cat] / total - share) < 0.03, (split, cat)
