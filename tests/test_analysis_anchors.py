"""`focaldet.analysis.anchors` and ``focaldet data anchors``: best possible recall (BPR) of an
anchor generator and anchors fitted to a dataset."""

import json
import re

import pytest
import torch
import yaml
from torchvision.ops import box_iou

from focaldet.analysis.anchors import (
    best_possible_recall,
    fit_anchors,
    input_boxes,
    input_sizes,
    read_boxes,
    unreachable,
)
from focaldet.data.cli import main as data_main
from focaldet.data.doctor import _resized_size
from focaldet.data.synth import write_synthetic_coco
from focaldet.config.inputs import InputSettings
from focaldet.modeling.anchors import AnchorGenerator

AT_256 = InputSettings(min_size=256, max_size=256)


@pytest.fixture(scope="module")
def small_synth(tmp_path_factory):
    """60 synthetic 256 px images (54 train: 282 boxes, 7 % of them tiny), seed 0."""
    return write_synthetic_coco(tmp_path_factory.mktemp("anchors_synth"), num_images=60, seed=0, val_fraction=0.1)


def test_a_box_equal_to_an_anchor_has_recall_one():
    # P3 anchor 32 x 32 (size 32, scale 1, ratio 1) centred on grid point (40, 48) of a 256 px input
    boxes, sizes = torch.tensor([[24.0, 32.0, 56.0, 64.0]]), torch.tensor([[256, 256]])
    report = best_possible_recall(boxes, sizes, AnchorGenerator(), AT_256)
    assert report.bpr == 1.0 and report.mean_best_iou == pytest.approx(1.0)
    assert report.level_share == [1.0, 0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("box", [[100.0, 100.0, 103.0, 103.0], [10.0, 120.0, 250.0, 124.0]])  # tiny; long, thin
def test_a_box_far_off_every_anchor_size_has_recall_zero(box):
    report = best_possible_recall(torch.tensor([box]), torch.tensor([[256, 256]]), AnchorGenerator(), AT_256)
    assert report.bpr == 0.0 and report.mean_best_iou < 0.2
    assert sum(missed for *_, missed in report.misses_by_size) == 1


def test_boxes_follow_their_image_resize():
    sizes = torch.tensor([[480, 640], [1000, 300], [17, 3000]])
    for settings in (InputSettings(), AT_256, InputSettings(600, 1000, 32)):
        resized, padded = input_sizes(sizes, settings)
        for (h, w), r, p in zip(sizes.tolist(), resized.tolist(), padded.tolist()):
            assert tuple(r) == _resized_size(h, w, settings.min_size, settings.max_size)
            assert all(v % settings.size_divisibility == 0 and v - settings.size_divisibility < s
                       for v, s in zip(p, r))
    inputs = input_boxes(torch.tensor([[0.0, 0.0, 64.0, 48.0]]), torch.tensor([[480, 640]]), InputSettings())
    # 480x640 -> 800x1067 (round(640 * 800 / 480)): x follows 1067 / 640, y 800 / 480
    torch.testing.assert_close(inputs.boxes, torch.tensor([[0.0, 0.0, 64 * 1067 / 640, 48 * 800 / 480]]))
    assert inputs.padded.tolist() == [[896, 1152]]


@pytest.mark.parametrize("generator", [
    AnchorGenerator(),
    AnchorGenerator(sizes=(12, 30, 50, 90, 200), scales=(1.0, 1.7), aspect_ratios=(0.3, 1.0, 1.5, 4.0), offset=0.5),
    AnchorGenerator(torchvision_compat=True),
], ids=["coco", "odd", "torchvision"])
def test_bpr_matches_brute_force_over_all_anchors(generator):
    torch.manual_seed(0)
    image_sizes = torch.tensor([[300, 420], [256, 256], [500, 380]]).repeat_interleave(70, dim=0)  # (210, 2)
    hw = image_sizes.flip(1).float()  # (W, H)
    xy = torch.rand(210, 2) * hw
    wh = torch.exp(torch.empty(210, 2).uniform_(0.5, 5.5))
    boxes = torch.cat([xy, torch.minimum(xy + wh, hw)], dim=1)  # (210, 4) original pixels
    settings = InputSettings(min_size=320, max_size=480, size_divisibility=32)
    report = best_possible_recall(boxes, image_sizes, generator, settings)

    inputs = input_boxes(boxes, image_sizes, settings)
    brute = torch.empty(len(boxes))
    for pad in torch.unique(inputs.padded, dim=0).tolist():
        rows = (inputs.padded == torch.tensor(pad)).all(dim=1)
        anchors = generator(generator.feature_shapes(*pad), "cpu", image_size=pad)  # every anchor
        brute[rows] = box_iou(inputs.boxes[rows], anchors).max(dim=1).values
    torch.testing.assert_close(report.best_iou, brute, atol=1e-5, rtol=0)
    assert report.bpr == pytest.approx(float((brute >= 0.5).float().mean()))
    assert 0.05 < report.bpr < 0.95  # a mix of hits and misses


def test_unreachable_boxes():
    gen = AnchorGenerator()  # offset 0: centres on multiples of the stride on every level
    boxes = torch.tensor([[35.0, 35.0, 45.0, 45.0],  # 10 px, centred on the P3 centre (40, 40)
                          [39.0, 39.0, 49.0, 49.0]])  # 10 px, 4 px off in x and y on every level
    inputs = input_boxes(boxes, torch.tensor([[256, 256]] * 2), AT_256)
    assert unreachable(inputs, gen).tolist() == [False, True]
    assert best_possible_recall(inputs, None, AnchorGenerator(sizes=(10, 20, 40, 80, 160))).best_iou[0] == 1.0


def test_fit_reaches_99_percent_on_a_small_synthetic_set(small_synth):
    data = read_boxes(small_synth.train_ann)
    current = best_possible_recall(data.boxes, data.image_sizes, AnchorGenerator(), AT_256)
    fit = fit_anchors(data.boxes, data.image_sizes, AT_256)
    assert current.bpr < 0.93  # COCO's anchors miss every tiny shape at 256 px
    assert fit.report.bpr >= 0.99 and fit.report.num_boxes == current.num_boxes == len(data.boxes)
    assert fit.sample.bpr == fit.report.bpr  # sample = all boxes here
    assert fit.generator.num_anchors == 9 and fit.generator.strides == (8, 16, 32, 64, 128)
    sizes = fit.init_args()["sizes"]
    assert sizes == sorted(sizes)
    # the reported numbers are those of an AnchorGenerator built from the printed values
    again = best_possible_recall(data.boxes, data.image_sizes, AnchorGenerator(**fit.init_args()), AT_256)
    assert again.bpr == fit.report.bpr and again.mean_best_iou == pytest.approx(fit.report.mean_best_iou)
    assert fit.ceiling >= fit.report.bpr


def test_fit_on_a_sample_reports_all_boxes(small_synth):
    data = read_boxes(small_synth.train_ann)
    fit = fit_anchors(data.boxes, data.image_sizes, AT_256, sample_size=100, offsets=(0.0,))
    assert fit.num_sample == fit.sample.num_boxes == 100 and fit.report.num_boxes == len(data.boxes)
    assert fit.generator.offset == 0.0


def test_cli_prints_yaml_that_reproduces_the_reported_bpr(small_synth, tmp_path, capsys):
    out = tmp_path / "anchors.json"
    code = data_main(["anchors", str(small_synth.train_ann), "--images", str(small_synth.images),
                      "--min-size", "256", "--max-size", "256", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    fitted = re.search(r"^  fitted +([\d.]+)% +([\d.]+)", text, re.M)
    current = re.search(r"^  current +([\d.]+)%", text, re.M)
    block = text[text.index("model:\n"):]
    init_args = yaml.safe_load(block)["model"]["model"]["anchor_generator"]["init_args"]
    assert yaml.safe_load(block)["model"]["model"]["anchor_generator"]["class_path"] == "focaldet.models.AnchorGenerator"
    data = read_boxes(small_synth.train_ann)
    report = best_possible_recall(data.boxes, data.image_sizes, AnchorGenerator(**init_args), AT_256)
    assert float(fitted.group(1)) == pytest.approx(100 * report.bpr, abs=0.005) and report.bpr >= 0.99
    assert float(fitted.group(2)) == pytest.approx(report.mean_best_iou, abs=0.0005)
    numbers = json.loads(out.read_text())
    assert numbers["fitted"]["bpr"] == report.bpr and numbers["fitted"]["init_args"] == init_args
    assert float(current.group(1)) == pytest.approx(100 * numbers["current"]["bpr"], abs=0.005)
    assert numbers["num_anchors_per_location"] == 9 and "head's shapes" in text


def test_cli_reads_the_current_anchors_and_sizes_from_a_config(small_synth, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model:\n  model:\n    anchor_generator:\n      class_path: focaldet.models.AnchorGenerator\n"
                   "      init_args: {sizes: [16, 32, 64, 128, 256]}\ndata:\n  min_size: 256\n  max_size: 256\n")
    out = tmp_path / "anchors.json"
    assert data_main(["anchors", str(small_synth.train_ann), "-c", str(cfg), "--sample", "150",
                      "--json", str(out)]) == 0
    numbers = json.loads(out.read_text())
    assert (numbers["min_size"], numbers["max_size"]) == (256, 256)
    data = read_boxes(small_synth.train_ann)
    current = best_possible_recall(data.boxes, data.image_sizes, AnchorGenerator(sizes=(16, 32, 64, 128, 256)), AT_256)
    assert numbers["current"]["bpr"] == current.bpr
    assert numbers["fitted"]["sample"]["num_boxes"] == 150 and numbers["fitted"]["num_boxes"] == len(data.boxes)
    assert "fitted, sample" in capsys.readouterr().out


@pytest.mark.parametrize("fault", ["malformed", "missing", "no_boxes", "bad_entry", "no_images_dir"])
def test_bad_input_is_one_line(tmp_path, small_synth, capsys, fault):
    ann = tmp_path / "instances.json"
    args = ["anchors", str(ann)]
    if fault == "malformed":
        ann.write_text('{"images": [{"id": 1, "file_name": "a.jpg",')  # cut short
        expected = "malformed JSON at line 1"
    elif fault == "missing":
        expected = "annotation file not found"
    elif fault == "no_boxes":
        ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 64}],
                                   "annotations": [], "categories": [{"id": 1, "name": "x"}]}))
        expected = "no boxes to fit anchors to"
    elif fault == "bad_entry":
        ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 0, "height": 64}],
                                   "annotations": [], "categories": [{"id": 1, "name": "x"}]}))
        expected = "width 0 is not a whole number"
    else:
        ann = small_synth.train_ann
        args = ["anchors", str(ann), "--images", str(tmp_path / "nowhere")]
        expected = "does not exist"
    capsys.readouterr()
    assert data_main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("focaldet data anchors: error: ") and expected in err[0], err
    if fault != "no_images_dir":
        assert str(ann) in err[0]
