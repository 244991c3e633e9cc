"""Crowd regions: background anchors mostly inside an ``iscrowd`` box are ignored (weight 0),
from the COCO JSON through transforms, collate and the module to the criterion."""

from functools import partial
import warnings

import pytest
import torch

from focaldet.data import CocoDataModule, CocoDetection, DataWarning, collate_detection, load_coco
from focaldet.data.transforms import build_pipeline
from focaldet.errors import ConfigError, DataError
from focaldet.losses import RetinaNetCriterion
from focaldet.losses.criterion import anchor_crowd_ioa
from tests.test_criterion import _outputs, _targets


def test_ioa_exact_numbers():
    anchors = torch.tensor([[0, 0, 10, 10], [5, 5, 15, 15], [20, 20, 30, 30]], dtype=torch.float)
    crowd = torch.tensor([[[0, 0, 10, 20], [0, 0, 0, 0]]], dtype=torch.float)  # one crowd box + padding
    ioa = anchor_crowd_ioa(anchors, crowd)  # (1, 3, 2)
    # anchor 0 fully inside (1.0), anchor 1: 5x10 of 100 (0.5), anchor 2: none; padding 0
    assert torch.equal(ioa, torch.tensor([[[1.0, 0.0], [0.5, 0.0], [0.0, 0.0]]]))


def test_anchors_inside_crowd_are_ignored_and_not_in_loss():
    out = _outputs(1)
    boxes = torch.tensor([[[4, 4, 40, 44]]], dtype=torch.float)
    labels = torch.tensor([[0]])
    crowd = torch.tensor([[[40, 40, 64, 64]]], dtype=torch.float)
    crit = RetinaNetCriterion()
    plain, t = crit.assign(out, boxes, labels), crit.assign(out, boxes, labels, crowd)
    ioa = anchor_crowd_ioa(out["anchors"], crowd)[0, :, 0]
    expect_ignored = (ioa >= 0.5) & (plain.weight[0] == 1) & ~plain.fg[0]
    assert expect_ignored.sum() > 0
    assert torch.equal(t.weight[0] == 0, (plain.weight[0] == 0) | expect_ignored)
    assert torch.equal(t.fg, plain.fg)  # positives stay positive
    # ignored anchors do not move the loss: changing their logits changes nothing
    loss = crit(out, boxes, labels, crowd)["loss"]
    for x, a in zip(out["cls_logits"], torch.cat([expect_ignored]).split([c.shape[1] for c in out["cls_logits"]])):
        x.data[0, a] += 5.0
    assert torch.allclose(crit(out, boxes, labels, crowd)["loss"], loss)


def test_positive_under_crowd_stays_positive():
    out = _outputs(1)
    boxes = torch.tensor([[[4, 4, 40, 44]]], dtype=torch.float)
    crowd = torch.tensor([[[-200, -200, 300, 300]]], dtype=torch.float)  # covers every anchor
    t = RetinaNetCriterion().assign(out, boxes, torch.tensor([[0]]), crowd)
    assert t.fg.sum() > 0 and torch.all(t.weight[t.fg] == 1) and torch.all(t.weight[~t.fg] == 0)


def test_threshold_configurable():
    out = _outputs(1)
    boxes, labels = torch.tensor([[[4, 4, 40, 44]]], dtype=torch.float), torch.tensor([[0]])
    crowd = torch.tensor([[[40, 40, 64, 64]]], dtype=torch.float)
    lo = RetinaNetCriterion(crowd_ioa_threshold=0.1).assign(out, boxes, labels, crowd).weight
    hi = RetinaNetCriterion(crowd_ioa_threshold=0.9).assign(out, boxes, labels, crowd).weight
    assert (lo == 0).sum() > (hi == 0).sum()


def test_no_crowd_is_bit_identical():
    out = _outputs(4)
    boxes, labels = _targets()
    crit = RetinaNetCriterion()
    a = crit(out, boxes, labels)
    for crowd in (None, torch.zeros(4, 0, 4)):
        b = crit(out, boxes, labels, crowd)
        assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------
# The data pipeline: JSON -> dataset item -> transforms -> collate -> module
# --------------------------------------------------------------------------------------

CATEGORIES = ({"id": 1, "name": "person"}, {"id": 5, "name": "kite"})


def _crowd_coco(make_coco, extra=()):
    """Image 1 (160x120): a person [10, 10, 40, 50] and a crowd region [80, 20, 140, 100]
    (xyxy); image 2: a person only; image 3: a kite crowd region only."""
    return make_coco(
        images=[(160, 120), (160, 120), (160, 120)],
        annotations=[
            {"image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 40]},
            {"image_id": 1, "category_id": 1, "bbox": [80, 20, 60, 80], "iscrowd": 1},
            {"image_id": 2, "category_id": 1, "bbox": [50, 30, 40, 40]},
            {"image_id": 3, "category_id": 5, "bbox": [0, 0, 100, 100], "iscrowd": 1},
            *extra,
        ],
        categories=CATEGORIES,
    )


def test_dataset_item_carries_crowd_boxes(make_coco):
    ds = CocoDetection(*_crowd_coco(make_coco))
    assert ds.num_crowd == 2
    s = ds[0]
    assert s["boxes"].tolist() == [[10, 10, 40, 50]] and s["labels"].tolist() == [0]
    assert s["crowd_boxes"].tolist() == [[80, 20, 140, 100]]  # apart from the boxes, no label
    assert ds[1]["crowd_boxes"].shape == (0, 4)
    assert ds[2]["boxes"].shape == (0, 4) and ds[2]["crowd_boxes"].tolist() == [[0, 0, 100, 100]]
    # a crowd region is not an object: an image with only a crowd region is empty
    assert CocoDetection(*_crowd_coco(make_coco), filter_empty=True).image_ids == [1, 2]


def test_transforms_keep_crowd_boxes_aligned(make_coco):
    ann, images = _crowd_coco(make_coco)
    flip = CocoDetection(ann, images, transforms=build_pipeline([{"name": "HorizontalFlip", "p": 1.0}]))[0]
    assert flip["boxes"].tolist() == [[120, 10, 150, 50]]  # x -> 160 - x
    assert flip["crowd_boxes"].tolist() == [[20, 20, 80, 100]]
    # shorter side 120 -> 60: scale 0.5 (decoded at 1/2 already, so the JPEG path scales them too)
    both = build_pipeline([{"name": "ResizeShortestEdge", "min_size": 60, "max_size": 1000},
                           {"name": "HorizontalFlip", "p": 1.0}])
    s = CocoDetection(ann, images, transforms=both)[0]
    assert s["size"] == (60, 80)
    assert s["boxes"].tolist() == [[60, 5, 75, 25]]  # (5, 5, 20, 25) flipped in 80 px
    assert s["crowd_boxes"].tolist() == [[10, 10, 40, 50]]  # (40, 10, 70, 50) flipped
    # a crop that leaves the crowd region out drops it; one that cuts it clips it
    crop = CocoDetection(ann, images, transforms=build_pipeline(
        [{"name": "Crop", "x_min": 0, "y_min": 0, "x_max": 60, "y_max": 120}]))[0]
    assert crop["boxes"].tolist() == [[10, 10, 40, 50]] and crop["crowd_boxes"].shape == (0, 4)
    cut = CocoDetection(ann, images, transforms=build_pipeline(
        [{"name": "Crop", "x_min": 0, "y_min": 0, "x_max": 100, "y_max": 60}]))[0]
    assert cut["crowd_boxes"].tolist() == [[80, 20, 100, 60]]


def test_collate_pads_crowd_boxes(make_coco):
    ds = CocoDetection(*_crowd_coco(make_coco))
    batch = collate_detection([ds[0], ds[1], ds[2]])
    assert batch["crowd_boxes"].shape == (3, 1, 4) and batch["crowd_boxes"].dtype == torch.float32
    assert batch["crowd_boxes"][:, 0].tolist() == [[80, 20, 140, 100], [0, 0, 0, 0], [0, 0, 100, 100]]
    assert collate_detection([ds[1]])["crowd_boxes"].shape == (1, 0, 4)  # none: C = 0
    plain = {k: v for k, v in ds[1].items() if k != "crowd_boxes"}  # a dataset without the key
    assert collate_detection([plain, ds[0]])["crowd_boxes"].shape == (2, 1, 4)


def test_crowd_annotation_errors_are_one_line(make_coco):
    bad = {"image_id": 1, "category_id": 1, "bbox": [10, 10, -5, 10], "iscrowd": 1}
    with pytest.raises(DataError, match=r"annotation 5 .*negative width or height") as e:
        load_coco(_crowd_coco(make_coco, [bad])[0])
    assert "\n" not in str(e.value)
    missing = {"image_id": 9, "category_id": 1, "bbox": [10, 10, 5, 10], "iscrowd": 1}
    with pytest.raises(DataError, match=r"referring to an image id .*annotation 5 \(image id 9\)") as e:
        load_coco(_crowd_coco(make_coco, [missing])[0])
    assert "\n" not in str(e.value)
    # a sliver crowd region is dropped like a sliver box, in the same one warning
    tiny = {"image_id": 2, "category_id": 1, "bbox": [10, 10, 0.5, 10], "iscrowd": 1}
    with pytest.warns(DataWarning, match=r"dropped 1 degenerate box\(es\) .*annotation ids 5\)"):
        ds = CocoDetection(*_crowd_coco(make_coco, [tiny]))
    assert ds.num_crowd == 2 and ds[1]["crowd_boxes"].shape == (0, 4)


def test_doctor_counts_crowd_regions(make_coco):
    from focaldet.data.doctor import check_dataset

    report = check_dataset(_crowd_coco(make_coco)[0])
    assert report.num_crowd == 2 and report.num_crowd_images == 2
    lines = [line for line in report.format().splitlines() if "crowd regions" in line]
    assert len(lines) == 1 and "2 in 2 images" in lines[0]


def test_repeat_factors_ignore_crowd_regions(make_coco):
    # the kite exists only as a crowd region: it is no instance, so it gets no repeat factor
    ann, images = _crowd_coco(make_coco)
    dm = CocoDataModule(train_ann=str(ann), train_images=str(images), num_workers=0,
                        sampler="repeat_factor", repeat_threshold=1.0)
    dm.setup("fit")
    # person in 2 of 3 images: sqrt(1 / (2/3)); counted, the kite (1 of 3) would give image 3 sqrt(3)
    assert dm.train_sampler().factors.tolist() == pytest.approx([1.5**0.5, 1.5**0.5, 1.0])


def test_val_ground_truth_keeps_crowd_annotations(make_coco):
    from focaldet.evaluation import detections_to_coco
    from focaldet.evaluation.coco import evaluate_coco

    ann, images = _crowd_coco(make_coco)
    dm = CocoDataModule(val_ann=str(ann), val_images=str(images), num_workers=0)
    dm.setup("validate")
    gt = dm.coco_gt("val")
    assert sorted(a["iscrowd"] for a in gt.dataset["annotations"]) == [0, 0, 1, 1]
    # COCOeval's crowd rule: a detection on the crowd region is no false positive
    dets = [{"boxes": torch.tensor([[10.0, 10, 40, 50], [85, 25, 135, 95]]), "scores": torch.tensor([0.9, 0.95]),
             "labels": torch.tensor([0, 0])},
            {"boxes": torch.tensor([[50.0, 30, 90, 70]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}]
    result = evaluate_coco(gt, detections_to_coco([1, 2], dets, [1, 5]))
    assert result.per_class["person"] == pytest.approx(1.0)


def _tiny_module(**kwargs):
    from focaldet.losses import RetinaNetCriterion
    from focaldet.models import ResNetBackbone, RetinaNet
    from focaldet.engine.module import RetinaNetModule

    torch.manual_seed(0)
    model = partial(RetinaNet, backbone=ResNetBackbone(18, norm="frozen_bn", freeze_at=0), fpn_channels=32, num_convs=1)
    return RetinaNetModule(2, model=model, criterion=RetinaNetCriterion(**kwargs))


@pytest.fixture
def crowd_batches(make_coco):
    ds = CocoDetection(*_crowd_coco(make_coco), transforms=build_pipeline(
        [{"name": "ResizeShortestEdge", "min_size": 120, "max_size": 160}]))
    return collate_detection([ds[0], ds[1]]), collate_detection([ds[1]])


def test_training_step_ignores_background_anchors_in_crowd(crowd_batches):
    batch, _ = crowd_batches
    module = _tiny_module()
    with warnings.catch_warnings():  # self.log without a trainer
        warnings.simplefilter("ignore")
        loss = module.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss)
    with torch.no_grad():
        outputs = module._forward(batch)
        crit = module.criterion
        plain = crit.assign(outputs, batch["boxes"], batch["labels"])
        t = crit.assign(outputs, batch["boxes"], batch["labels"], batch["crowd_boxes"])
        ioa = anchor_crowd_ioa(outputs["anchors"], batch["crowd_boxes"]).amax(-1)  # (N, R)
        ignored = (ioa >= 0.5) & (plain.weight == 1) & ~plain.fg
        assert ignored[0].sum() > 100 and ignored[1].sum() == 0  # image 1 has none
        assert torch.equal(t.weight == 0, (plain.weight == 0) | ignored) and torch.equal(t.fg, plain.fg)
        # the module's loss is the crowd-aware one, and differs from the crowd-blind one
        assert torch.equal(module._losses(batch)["loss"], crit(outputs, batch["boxes"], batch["labels"],
                                                               batch["crowd_boxes"])["loss"])
        assert not torch.equal(module._losses(batch)["loss"], crit(outputs, batch["boxes"], batch["labels"])["loss"])


def test_no_crowd_batch_and_off_switch_are_bit_identical(crowd_batches):
    batch, no_crowd = crowd_batches
    module = _tiny_module()
    with torch.no_grad():
        for b in (no_crowd, {k: v for k, v in no_crowd.items() if k != "crowd_boxes"}):
            assert b.get("crowd_boxes", torch.zeros(1, 0, 4)).shape[1] == 0
            old = module.criterion(module._forward(b), b["boxes"], b["labels"])
            new = module._losses(b)
            assert all(torch.equal(old[k], new[k]) for k in old)
        off = _tiny_module(crowd_ioa_threshold=None)
        old = off.criterion(off._forward(batch), batch["boxes"], batch["labels"])
        new = off._losses(batch)
        assert all(torch.equal(old[k], new[k]) for k in old)


def test_torchvision_twin_drops_crowd_boxes(crowd_batches):
    from focaldet.tools.equal_budget import TorchvisionRetinaNetModule
    from focaldet.losses import L1Loss
    from focaldet.losses import RetinaNetCriterion
    from focaldet.models import ResNetBackbone, RetinaNet

    batch, _ = crowd_batches
    model = partial(RetinaNet, backbone=ResNetBackbone(18, norm="frozen_bn", freeze_at=0), fpn_channels=32, num_convs=1)
    twin = TorchvisionRetinaNetModule(2, model=model, criterion=RetinaNetCriterion(box_loss=L1Loss()))
    losses = twin._losses(batch)
    assert torch.isfinite(losses["loss"])


def test_threshold_from_yaml(synth_coco, tmp_path):
    from focaldet.cli import FocaldetCLI
    from focaldet.engine.module import RetinaNetModule

    from helpers import tiny_config

    def build(value):
        config = tiny_config(tmp_path, synth_coco)
        text = config.read_text().replace("model:\n", f"model:\n  criterion:\n    crowd_ioa_threshold: {value}\n", 1)
        config.write_text(text)
        return FocaldetCLI(RetinaNetModule, CocoDataModule, args=["-c", str(config)], run=False,
                           trainer_defaults={"logger": False}).model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert build(0.7).criterion.crowd_ioa_threshold == 0.7
        assert build("null").criterion.crowd_ioa_threshold is None
    assert _tiny_module().criterion.crowd_ioa_threshold == 0.5  # CROWD_IOA_THRESHOLD
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="crowd_ioa_threshold"):
            _tiny_module(crowd_ioa_threshold=bad)
