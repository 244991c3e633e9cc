"""Lean training annotations (focaldet/data/lean.py): the same records, counts and warnings
as the pycocotools path of CocoDetection (crowd regions, degenerate boxes, filter_empty,
unsorted ids, categories with gaps), cached arrays reused while the JSON is unchanged, the
loader's one-line errors, and the data module training on them."""

import warnings

import numpy as np
import pytest

import focaldet.data.coco as coco_mod
from focaldet.data import CocoDataModule
from focaldet.data.coco import CocoDetection, DataWarning
from focaldet.data.lean import RecordTable, load_lean
from focaldet.errors import DataError


def _records_equal(a, b):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in ra:
            if isinstance(ra[key], np.ndarray):
                assert ra[key].dtype == rb[key].dtype and ra[key].shape == rb[key].shape, key
                np.testing.assert_array_equal(ra[key], rb[key], err_msg=key)
            else:
                assert ra[key] == rb[key], key


def _both(ann, images, **kw):
    with warnings.catch_warnings(record=True) as w_ref:
        warnings.simplefilter("always")
        ref = CocoDetection(ann, images, **kw)
    with warnings.catch_warnings(record=True) as w_lean:
        warnings.simplefilter("always")
        lean = CocoDetection(ann, images, lean=load_lean(ann), **kw)
    assert [str(w.message) for w in w_lean] == [str(w.message) for w in w_ref]
    return ref, lean


@pytest.fixture
def messy(make_coco):
    """Crowd regions, degenerate and out-of-border boxes, an empty image, unsorted image and
    annotation ids, category ids with gaps, a missing iscrowd."""
    anns = [
        {"image_id": 2, "category_id": 7, "bbox": [10, 10, 20, 15]},
        {"image_id": 1, "category_id": 3, "bbox": [-5, 2, 30, 40], "iscrowd": 1},
        {"image_id": 1, "category_id": 7, "bbox": [60, 40, 30, 30]},  # clipped to 64x48
        {"image_id": 1, "category_id": 3, "bbox": [5, 5, 0.5, 10]},  # degenerate
        {"image_id": 3, "category_id": 3, "bbox": [70, 10, 5, 5], "iscrowd": 1},  # outside: degenerate crowd
        {"image_id": 2, "category_id": 3, "bbox": [1.25, 2.5, 10.125, 7]},
    ]
    cats = [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}]
    return make_coco(images=[(64, 48), (50, 40), (64, 48), (30, 30)], annotations=anns, categories=cats)


@pytest.mark.parametrize("filter_empty", [False, True])
def test_lean_records_equal_the_coco_path(messy, filter_empty):
    ann, images = messy
    ref, lean = _both(ann, images, filter_empty=filter_empty)
    assert isinstance(lean.records, RecordTable) and lean.coco is None
    _records_equal(list(lean.records), ref.records)
    assert (lean.num_crowd, lean.num_degenerate) == (ref.num_crowd, ref.num_degenerate) == (1, 2)
    assert lean.label_map == ref.label_map
    assert lean.image_ids == ref.image_ids
    for i in range(len(ref)):
        assert lean[i]["boxes"].tolist() == ref[i]["boxes"].tolist()


def test_lean_records_equal_on_bccd(bccd_dir):
    ann = bccd_dir / "annotations" / "instances_train.json"
    ref, lean = _both(ann, bccd_dir / "images")
    _records_equal(list(lean.records), ref.records)
    rows = np.arange(0, len(ref), 3)
    _records_equal(list(lean.records.take(rows)), [ref.records[i] for i in rows])


def test_cache_reused_while_the_file_is_unchanged(messy, monkeypatch):
    ann, _ = messy
    first = load_lean(ann)
    calls = []
    real = coco_mod.checked_coco_data
    monkeypatch.setattr(coco_mod, "checked_coco_data", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = load_lean(ann)
    assert calls == []
    for name in ("image_ids", "file_names", "ann_offsets", "ann_boxes", "ann_crowd", "ann_cats"):
        np.testing.assert_array_equal(getattr(again, name), getattr(first, name))
    assert again.categories == first.categories
    ann.write_text(ann.read_text().replace('"b"', '"bee"'))  # changed: parsed again
    assert [c["name"] for c in load_lean(ann).categories] == ["bee", "a"] and calls == [1]


def test_warnings_shown_again_from_the_cache(make_coco):
    boxes = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 60, 45]} for _ in range(25)]  # xyxy-like
    ann, _ = make_coco(images=[(64, 48)], annotations=boxes)
    for _ in range(2):
        with pytest.warns(DataWarning, match="past the"):
            load_lean(ann)


def test_errors_are_the_loaders(make_coco):
    ann, _ = make_coco(annotations=[{"image_id": 9, "category_id": 1, "bbox": [0, 0, 5, 5]}])
    with pytest.raises(DataError) as ref:
        coco_mod.load_coco(ann)
    with pytest.raises(DataError) as lean:
        load_lean(ann)
    assert str(lean.value) == str(ref.value) and "\n" not in str(lean.value)
    with pytest.raises(DataError, match="not found"):
        load_lean(ann.parent / "missing.json")


def test_datamodule_trains_on_lean_records(synth_coco):
    dm = CocoDataModule(train_ann=str(synth_coco.train_ann), train_images=str(synth_coco.images),
                        val_ann=str(synth_coco.val_ann), val_images=str(synth_coco.images), num_workers=0,
                        sampler="repeat_factor")
    dm.setup("fit")
    train = dm.datasets["train"]
    assert isinstance(train.records, RecordTable) and train.coco is None
    assert dm.datasets["val"].coco is not None  # the evaluation ground truth stays a COCO
    _records_equal(list(train.records), CocoDetection(synth_coco.train_ann, synth_coco.images).records)
    batch = next(iter(dm.train_dataloader()))
    assert len(batch) > 0
