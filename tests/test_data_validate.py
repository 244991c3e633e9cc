"""Property-based: whatever a COCO file holds, the loader gives a valid dataset or one
`DataError` line, and the doctor agrees with it."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from focaldet.data import CocoDetection, check_dataset, load_coco
from focaldet.errors import DataError

_junk = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.integers() | st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False)
    | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
)
_ids = st.integers(0, 4) | _junk  # mostly small ints, so ids collide and refer to each other
_number = st.integers(-5, 80) | st.floats(-5, 80, allow_subnormal=False) | st.sampled_from([math.nan, math.inf, 10**400, 0, True]) | _junk


def _maybe(d: dict) -> st.SearchStrategy:
    """A dict strategy whose keys may each be missing."""
    return st.fixed_dictionaries({}, optional=d)


_image = _maybe({"id": _ids, "file_name": st.sampled_from(["a.jpg", "b.jpg"]) | _junk, "width": _number,
                 "height": _number}) | _junk
_category = _maybe({"id": _ids, "name": st.text(max_size=3) | _junk}) | _junk
_annotation = _maybe({
    "id": _ids, "image_id": _ids, "category_id": _ids, "iscrowd": st.sampled_from([0, 1]) | _junk,
    "area": _number, "bbox": st.lists(_number, min_size=3, max_size=5) | _junk,
}) | _junk
_coco = _maybe({
    "images": st.lists(_image, max_size=4) | _junk,
    "annotations": st.lists(_annotation, max_size=6) | _junk,
    "categories": st.lists(_category, max_size=3) | _junk,
}) | _junk




def _mostly(valid: st.SearchStrategy, odd: st.SearchStrategy, weight: int = 30) -> st.SearchStrategy:
    """``valid`` about ``weight`` times as often as ``odd``."""
    return st.integers(0, weight).flatmap(lambda i: odd if i == 0 else valid)  # one_of would flatten odd's branches


# Nearly valid files: every key there, most values fine, a few odd ones -- so that valid
# datasets with boxes are common, and a single bad value must be caught.
_side = _mostly(st.integers(8, 80), _number)
_near_coco = st.fixed_dictionaries({
    "images": st.lists(st.fixed_dictionaries({
        "id": _mostly(st.integers(1, 2), _ids), "file_name": _mostly(st.sampled_from(["a.jpg", "b.jpg", "c.png"]), _junk),
        "width": _side, "height": _side}), min_size=1, max_size=4, unique_by=lambda d: repr(d["id"])),
    "annotations": st.lists(st.fixed_dictionaries({
        "id": _mostly(st.integers(1, 50), _ids), "image_id": _mostly(st.integers(1, 2), _ids),
        "category_id": _mostly(st.integers(1, 2), _ids), "iscrowd": _mostly(st.just(0), _junk),
        "bbox": _mostly(st.tuples(*(st.floats(lo, hi, allow_subnormal=False) for lo, hi in ((-4, 60), (-4, 40), (0, 60), (0, 40)))).map(list),
                        st.lists(_number, min_size=3, max_size=5) | _junk, 15),
    }), max_size=6, unique_by=lambda d: repr(d["id"])),
    "categories": st.lists(st.fixed_dictionaries({"id": _mostly(st.integers(1, 2), _ids), "name": st.just("x")}),
                           min_size=1, max_size=2, unique_by=lambda d: repr(d["id"])),
})


@pytest.mark.filterwarnings("ignore::focaldet.data.DataWarning")  # degenerate boxes, xyxy hints
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=_coco | _near_coco)
def test_any_json_gives_a_dataset_or_one_data_error(tmp_path, data):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    report = check_dataset(path)
    try:
        coco = load_coco(path)
    except DataError as e:
        assert "\n" not in str(e) and str(e).startswith(f"{path}: ")
        assert not report.ok and report.errors
        return
    assert report.ok, report.errors
    dataset = CocoDetection(path, tmp_path, coco=coco)  # no image is read
    assert len(dataset) == len(coco.dataset["images"]) == report.num_images
    for rec in dataset.records:
        boxes = rec["boxes"]
        assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()
        assert (boxes >= 0).all() and (boxes[:, 2] <= rec["width"]).all() and (boxes[:, 3] <= rec["height"]).all()
        assert rec["height"] >= 1 and rec["width"] >= 1
        assert ((0 <= rec["labels"]) & (rec["labels"] < dataset.label_map.num_classes)).all()
    assert sum(len(r["boxes"]) for r in dataset.records) == report.num_trainable
