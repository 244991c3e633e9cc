"""CocoDataModule: label map at construction, loaders, ground truth, checkpoint state."""

from __future__ import annotations

import pytest
import torch

from focaldet.data import CocoDataModule, LabelMap
from focaldet.errors import ConfigError, DataError
from focaldet.structures.boxes import rescale_boxes


def _dm(synth, **kwargs):
    defaults = dict(
        train_ann=str(synth.train_ann),
        train_images=str(synth.images),
        val_ann=str(synth.val_ann),
        val_images=str(synth.images),
        batch_size=3,
        num_workers=0,
        min_size=160,
        max_size=400,
    )
    return CocoDataModule(**{**defaults, **kwargs})


def test_label_map_known_at_construction(synth_coco):
    dm = _dm(synth_coco)
    assert dm.num_classes == 4
    assert dm.label_map.cat_ids == [1, 3, 7, 8]
    assert dm.label_map.names == ["circle", "square", "triangle", "cross"]
    # val only: categories are read from the val file
    assert CocoDataModule(val_ann=str(synth_coco.val_ann), val_images=str(synth_coco.images)).num_classes == 4


def test_train_and_val_batches(synth_coco):
    dm = _dm(synth_coco)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (3, 3, 256, 256) and batch["images"].dtype == torch.uint8
    assert batch["image_sizes"].tolist() == [[160, 160]] * 3
    assert batch["orig_sizes"].tolist() == [[128, 128]] * 3
    valid = batch["labels"] >= 0
    assert batch["labels"][valid].max() < 4
    assert (batch["boxes"][valid][:, 2:] > batch["boxes"][valid][:, :2]).all()

    val = dm.val_dataloader()
    ids = [i for b in val for i in b["image_ids"].tolist()]
    assert ids == sorted(ids) == [13, 14, 15, 16]  # deterministic order, nothing dropped
    assert ids == [i for b in dm.val_dataloader() for i in b["image_ids"].tolist()]


def test_coco_gt_is_parsed_once(synth_coco):
    dm = _dm(synth_coco, test_ann=str(synth_coco.val_ann), test_images=str(synth_coco.images))
    gt = dm.coco_gt("val")
    assert gt is dm.coco_gt("validate") is dm.coco_gt("test")
    assert sorted(gt.getImgIds()) == [13, 14, 15, 16]
    dm.setup("validate")
    assert dm.datasets["val"].coco is gt


def test_predict_only_takes_the_label_map(synth_coco):
    """The label map travels in the checkpoint (``checkpoint["focaldet"]``), not in the data
    module's state: a predict-only data module gets it as an argument."""
    dm = _dm(synth_coco)
    state = {"label_map": dm.label_map.to_dict()}
    predict = CocoDataModule(predict_images=str(synth_coco.images), batch_size=4, num_workers=0, min_size=64, max_size=64)
    with pytest.raises(ConfigError, match="classes are unknown"):
        predict.num_classes
    assert dm.state_dict() == {}  # stored once, by the model

    given = CocoDataModule(predict_images=str(synth_coco.images), label_map=state["label_map"], num_workers=0,
                           batch_size=4, min_size=64, max_size=64)
    assert given.num_classes == 4
    batches = list(given.predict_dataloader())
    assert sum(len(b["image_ids"]) for b in batches) == 16
    first = batches[0]
    assert first["image_ids"].tolist() == [0, 1, 2, 3]
    assert first["boxes"].shape == (4, 0, 4) and first["labels"].shape == (4, 0)
    assert first["images"].shape == (4, 3, 128, 128) and first["image_sizes"].tolist() == [[64, 64]] * 4
    torch.testing.assert_close(
        rescale_boxes(torch.tensor([[0.0, 0.0, 64.0, 32.0]]), first["image_sizes"][0], first["orig_sizes"][0]),
        torch.tensor([[0.0, 0.0, 128.0, 64.0]]),
    )


def test_label_map_argument_must_match_annotations(synth_coco):
    with pytest.raises(DataError, match="differ from the given label_map"):
        _dm(synth_coco, label_map=LabelMap([1, 2], ["a", "b"]).to_dict())


def test_config_errors(synth_coco):
    with pytest.raises(ConfigError, match="train_ann and train_images must be given together"):
        CocoDataModule(train_ann=str(synth_coco.train_ann))
    dm = CocoDataModule(val_ann=str(synth_coco.val_ann), val_images=str(synth_coco.images))
    with pytest.raises(ConfigError, match="no train data"):
        dm.train_dataloader()
    assert CocoDataModule(predict_images=str(synth_coco.images)).val_dataloader() == []


def test_custom_transforms_and_worker_loading(synth_coco):
    dm = _dm(
        synth_coco,
        num_workers=2,
        train_transforms=[{"name": "ResizeShortestEdge", "min_size": 96, "max_size": 96}, {"name": "VerticalFlip", "p": 1.0}],
        eval_transforms=[{"name": "ResizeShortestEdge", "min_size": 64, "max_size": 64}],
    )
    loader = dm.train_dataloader()
    assert loader.persistent_workers and loader.num_workers == 2
    batches = list(loader)
    assert sum(len(b["image_ids"]) for b in batches) == 12
    assert all(b["image_sizes"].tolist() == [[96, 96]] * len(b["image_ids"]) for b in batches)
    assert next(iter(dm.val_dataloader()))["image_sizes"][0].tolist() == [64, 64]
    assert not _dm(synth_coco).train_dataloader().persistent_workers  # num_workers=0


def test_workers_forked_after_opencv_was_used_do_not_hang(synth_coco):
    """OpenCV's thread pool does not survive fork(): workers forked after the main process
    resized images (here: a num_workers=0 epoch) used to hang in their first OpenCV call."""
    import cv2
    cv2.setNumThreads(2)
    for _ in _dm(synth_coco, num_workers=0).train_dataloader():  # the pool is busy in this process
        pass
    loader = _dm(synth_coco, num_workers=1).train_dataloader()
    assert cv2.getNumThreads() == 1  # 0 = OpenCV's "sequential" setting, reported as 1
    assert sum(len(b["image_ids"]) for b in loader) == 12
