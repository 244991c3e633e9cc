"""``focaldet data split``: one COCO JSON -> train / val (/ test) JSONs, stratified by class.

An image goes to exactly one split, with all its annotations. Images are grouped by their
*rarest* class (the class in the image that the fewest images of the whole file contain;
images without boxes form a group of their own), and every group is cut in the requested
proportions: so each class is spread over the splits as far as its images allow, the rare
ones first (multi-label images cannot make every class exact at once). The split sizes are
exact (``round(N * val)`` and ``round(N * test)`` images): the fractional shares of the
groups go, largest first, to groups that keep at least one training image; so a class
with a single image stays in train. The random order within a group comes from ``seed``:
the same file and seed give the same split.

::

    from focaldet.data.split import split_coco
    parts = split_coco(data, val=0.2, test=0.1, seed=0)  # {"train": {...}, "val": {...}, "test": {...}}
"""

from __future__ import annotations

import json
import math
import os
import random
from collections import Counter, defaultdict
from pathlib import Path

from focaldet.data.coco import read_coco_json
from focaldet.data.validate import validate_coco
from focaldet.errors import ConfigError, DataError

__all__ = ["SPLITS", "split_coco", "split_file", "format_split"]

SPLITS = ("train", "val", "test")
EMPTY = -1  # the group of images without boxes


def _check_fractions(val: float, test: float) -> None:
    for name, value in (("--val", val), ("--test", test)):
        if not (0 <= value < 1) or not math.isfinite(value):
            raise ConfigError(f"data split: {name} must be a fraction in [0, 1), got {value}")
    if val + test >= 1:
        raise ConfigError(f"data split: --val {val} + --test {test} leaves no image for train")


def _assign(groups: dict[int, list[int]], targets: dict[str, int], rng: random.Random) -> dict[int, str]:
    """image id -> split: each group cut in the proportions of ``targets`` (largest remainder)."""
    total = sum(len(ids) for ids in groups.values())
    quota: dict[int, dict[str, int]] = {}
    remainders: dict[str, list[tuple[float, float, int]]] = {s: [] for s in ("val", "test")}
    for key, ids in groups.items():
        quota[key] = {}
        for split in ("val", "test"):
            exact = len(ids) * targets[split] / total if total else 0.0
            quota[key][split] = int(exact)
            remainders[split].append((exact - int(exact), rng.random(), key))
    for split in ("val", "test"):
        left = targets[split] - sum(q[split] for q in quota.values())
        for _, _, key in sorted(remainders[split], reverse=True):
            if left <= 0:
                break
            if len(groups[key]) - quota[key]["val"] - quota[key]["test"] > 1:  # keep one in train
                quota[key][split] += 1
                left -= 1
        for _, _, key in sorted(remainders[split], reverse=True):  # tiny files: any image left
            while left > 0 and len(groups[key]) - quota[key]["val"] - quota[key]["test"] > 0:
                quota[key][split] += 1
                left -= 1
    where: dict[int, str] = {}
    for key, ids in groups.items():
        ids = list(ids)
        rng.shuffle(ids)
        n_val, n_test = quota[key]["val"], quota[key]["test"]
        for i, image_id in enumerate(ids):
            where[image_id] = "val" if i < n_val else "test" if i < n_val + n_test else "train"
    return where


def split_coco(data: dict, val: float, test: float = 0.0, seed: int = 0, source: str = "annotations") -> dict[str, dict]:
    """Split a COCO dict into ``{"train", "val"[, "test"]}`` COCO dicts (see the module doc).

    Each part keeps ``info``, ``licenses`` and all ``categories``, and the ids of its images
    and annotations; ``test`` is only present when ``test > 0``. Raises `ConfigError` for bad
    fractions, `DataError` (naming ``source``) for an invalid file or too few images."""
    _check_fractions(val, test)
    checked = validate_coco(data)
    errors = checked.problems.errors
    if errors:
        raise DataError(f"{source}: {' | '.join(errors)}")
    images = list(data.get("images") or [])
    n = len(images)
    targets = {"val": round(n * val), "test": round(n * test)}
    if val > 0 and targets["val"] == 0 or test > 0 and targets["test"] == 0 or n - targets["val"] - targets["test"] < 1:
        raise DataError(f"{source}: {n} image(s) are too few for --val {val} --test {test} "
                        f"(each split needs at least one image)")
    classes_of: dict[int, set[int]] = defaultdict(set)
    for ann in data.get("annotations") or []:
        classes_of[ann["image_id"]].add(ann["category_id"])
    images_per_class = Counter(c for cs in classes_of.values() for c in cs)
    groups: dict[int, list[int]] = defaultdict(list)
    for img in images:
        cs = classes_of.get(img["id"])
        groups[min(cs, key=lambda c: (images_per_class[c], c)) if cs else EMPTY].append(img["id"])
    where = _assign(dict(sorted(groups.items())), targets, random.Random(seed))
    names = [s for s in SPLITS if s != "test" or test > 0]
    base = {k: v for k, v in data.items() if k not in ("images", "annotations")}
    parts = {s: {**base, "images": [], "annotations": []} for s in names}
    for img in images:
        parts[where[img["id"]]]["images"].append(img)
    for ann in data.get("annotations") or []:
        parts[where[ann["image_id"]]]["annotations"].append(ann)
    return parts


def split_file(ann_file: str | os.PathLike, out_dir: str | os.PathLike, val: float, test: float = 0.0,
               seed: int = 0) -> dict[str, Path]:
    """`split_coco` of a file, written as ``OUT/train.json``, ``OUT/val.json`` (``OUT/test.json``);
    returns split -> path."""
    _check_fractions(val, test)
    data = read_coco_json(ann_file)
    if not isinstance(data, dict):
        raise DataError(f"{ann_file}: not a COCO JSON object")
    parts = split_coco(data, val, test, seed, source=str(ann_file))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, part in parts.items():
        paths[split] = out / f"{split}.json"
        paths[split].write_text(json.dumps(part))
    return paths


def format_split(parts: dict[str, dict]) -> str:
    """Images and boxes per split, and each class's boxes per split."""
    names = list(parts)
    cats = next(iter(parts.values())).get("categories") or []
    lines = [f"{'':<20}" + "".join(f"{s:>10}" for s in names),
             f"{'images':<20}" + "".join(f"{len(parts[s]['images']):>10}" for s in names),
             f"{'boxes':<20}" + "".join(f"{len(parts[s]['annotations']):>10}" for s in names)]
    counts = {s: Counter(a["category_id"] for a in parts[s]["annotations"]) for s in names}
    for cat in cats:
        name = str(cat.get("name", cat["id"]))[:18]
        lines.append(f"  {name:<18}" + "".join(f"{counts[s][cat['id']]:>10}" for s in names))
    return "\n".join(lines)
