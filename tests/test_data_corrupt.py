"""``focaldet data corrupt``: exact counts, determinism, nesting, everything else kept, errors."""

import json

import pytest

from focaldet.data.cli import main
from focaldet.data.corrupt import corrupt_coco
from focaldet.errors import ConfigError, DataError


def _dataset(n=50, crowd=2):
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 200, "height": 100, "extra": "kept"} for i in range(5)]
    anns = [{"id": 100 + j, "image_id": j % 5, "category_id": [1, 3, 7][j % 3], "bbox": [10.0 + j, 20.0, 40.0, 30.0],
             "area": 1200.0, "iscrowd": int(j < crowd), "note": j} for j in range(n)]
    cats = [{"id": c, "name": f"c{c}"} for c in (1, 3, 7)]
    return {"info": {"year": 2026}, "licenses": [], "images": images, "annotations": anns, "categories": cats}


def test_exact_counts_and_flip_to_another_class():
    data = _dataset()
    noisy, s = corrupt_coco(data, flip_labels=0.2, drop_boxes=0.1, seed=3)
    # 48 non-crowd: round(4.8) = 5 dropped; of the 43 kept round(8.6) = 9 flipped
    assert (s.annotations, s.crowd, len(s.dropped), len(s.flipped), s.jittered) == (50, 2, 5, 9, 0)
    assert len(noisy["annotations"]) == 45
    before = {a["id"]: a for a in data["annotations"]}
    after = {a["id"]: a for a in noisy["annotations"]}
    assert set(before) - set(after) == set(s.dropped) and not set(s.dropped) & {100, 101}  # crowd kept
    changed = {i for i in after if after[i]["category_id"] != before[i]["category_id"]}
    assert changed == {f[0] for f in s.flipped}
    for i, old, new in s.flipped:
        assert before[i]["category_id"] == old and after[i]["category_id"] == new != old and new in (1, 3, 7)
    # everything else kept, the input untouched
    assert noisy["images"] == data["images"] and noisy["info"] == data["info"] and noisy["categories"] == data["categories"]
    assert all(after[i]["note"] == before[i]["note"] and after[i]["bbox"] == before[i]["bbox"] for i in after)
    assert data == _dataset()


def test_deterministic_and_nested_across_levels():
    a = corrupt_coco(_dataset(), flip_labels=0.2, seed=7)[1]
    b = corrupt_coco(_dataset(), flip_labels=0.2, seed=7)[1]
    c = corrupt_coco(_dataset(), flip_labels=0.4, seed=7)[1]
    d = corrupt_coco(_dataset(), flip_labels=0.2, seed=8)[1]
    assert a.flipped == b.flipped and len(a.flipped) == 10 and len(c.flipped) == 19
    assert {f[0] for f in a.flipped} <= {f[0] for f in c.flipped}  # the 20 % are among the 40 %
    assert {f[0] for f in a.flipped} != {f[0] for f in d.flipped}


def test_flips_are_uniform_over_the_other_classes():
    data = _dataset(n=3000, crowd=0)
    _, s = corrupt_coco(data, flip_labels=1.0, seed=0)
    from_1 = [new for _, old, new in s.flipped if old == 1]
    assert len(s.flipped) == 3000 and set(from_1) == {3, 7}
    assert abs(from_1.count(3) / len(from_1) - 0.5) < 0.05


def test_jitter_in_units_of_box_size_clipped_to_the_image():
    data = _dataset(crowd=0)
    data["annotations"][0].update(bbox=[190.0, 90.0, 10.0, 10.0], area=100.0)  # at the corner: clipped
    small, s_small = corrupt_coco(data, jitter_boxes=0.02, seed=0)
    large, s_large = corrupt_coco(data, jitter_boxes=0.3, seed=0)
    assert s_small.jittered == s_large.jittered == 50
    assert 0.9 < s_small.jitter_mean_iou < 1.0 and s_large.jitter_mean_iou < s_small.jitter_mean_iou
    for a in large["annotations"]:
        x, y, w, h = a["bbox"]
        assert x >= 0 and y >= 0 and x + w <= 200 and y + h <= 100 and w >= 1 and h >= 1
        assert a["area"] == pytest.approx(w * h)  # a box area follows the box
    dx = [abs(a["bbox"][0] - b["bbox"][0]) for a, b in zip(small["annotations"][1:], data["annotations"][1:])]
    assert max(dx) < 0.02 * 40 * 5  # edges move by ~N(0, 0.02 * width)


def test_errors():
    with pytest.raises(ConfigError, match="--flip-labels must be a fraction"):
        corrupt_coco(_dataset(), flip_labels=1.5)
    with pytest.raises(ConfigError, match="--jitter-boxes must be >= 0"):
        corrupt_coco(_dataset(), jitter_boxes=-1)
    one = _dataset()
    one["categories"] = one["categories"][:1]
    with pytest.raises(DataError, match="no other class"):
        corrupt_coco(one, flip_labels=0.5)


def test_cli_writes_the_copy_and_the_summary(tmp_path, capsys):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(_dataset()))
    out = tmp_path / "noisy" / "ann_noisy.json"
    assert main(["corrupt", str(ann), "--out", str(out), "--flip-labels", "0.25", "--drop-boxes", "0.5",
                 "--jitter-boxes", "0.05", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert "dropped 24" in text and "flipped 6 labels" in text and "jittered 24 boxes" in text
    assert len(json.loads(out.read_text())["annotations"]) == 26
    summary = json.loads((tmp_path / "noisy" / "ann_noisy.summary.json").read_text())
    assert summary["source"] == str(ann) and len(summary["dropped"]) == 24 and summary["seed"] == 1
    # bad input: one line naming the file
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert main(["corrupt", str(bad), "--out", str(out), "--seed", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("focaldet data corrupt: error:") and str(bad) in err and "\n" not in err
    assert main(["corrupt", str(ann), "--out", str(ann), "--seed", "0"]) == 1
    assert "must not be the input" in capsys.readouterr().err
