"""The one predictor: the resize rule once, the batch rule, and the checkpoint as the CLI's
default that typed flags override (issue 21)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from focaldet.errors import ConfigError
import torch
import torch.nn.functional as F
import yaml

from focaldet.analysis.anchors import input_sizes
from focaldet.api import Detector
from focaldet.cli import FocaldetCLI, _config_from_checkpoint, main
from focaldet.data import CocoDataModule
from focaldet.data.coco import LabelMap
from focaldet.data.doctor import _resized_size
from focaldet.data.transforms import build_pipeline
from focaldet.export.graph import eval_size
from focaldet.inference import Predictor, size_groups
from focaldet.config.inputs import InputSettings, resized_size
from focaldet.modeling import PostProcess, ResNetBackbone, RetinaNet
from focaldet.engine.module import RetinaNetModule

from helpers import save_untrained_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore")

SIZE_PAIRS = [(h, w) for h, w in zip(random.Random(0).sample(range(8, 3000), 120),
                                      random.Random(1).sample(range(8, 3000), 120))]
SIZE_PAIRS += [(3, 5), (5, 10), (480, 640), (640, 480), (1, 4000), (4000, 1), (333, 517), (300, 455)]


@pytest.mark.parametrize("min_size,max_size", [(800, 1333), (96, 128), (100, 1000), (256, 512)])
def test_every_resize_is_the_one_rule(min_size, max_size):
    """ResizeShortestEdge, the doctor, the anchor analysis and the export graph's size agree
    with `resized_size` on many size pairs (exact halves included)."""
    settings = InputSettings(min_size, max_size)
    resized, _ = input_sizes(torch.tensor(SIZE_PAIRS), settings)
    pipeline = build_pipeline([{"name": "ResizeShortestEdge", "min_size": min_size, "max_size": max_size}])
    for k, (h, w) in enumerate(SIZE_PAIRS):
        want = resized_size(h, w, min_size, max_size)
        s = min(min_size / min(h, w), max_size / max(h, w))  # the rule, written out once more here
        assert all(abs(got - x * s) <= 0.5 + 1e-9 or got == 1 for got, x in zip(want, (h, w)))
        assert eval_size(h, w, min_size, max_size) == want
        assert _resized_size(h, w, min_size, max_size) == want
        assert tuple(resized[k].tolist()) == want
        if k % 8 == 0 and max(want) <= 2000 and max(h, w) <= 2000:
            out = pipeline(image=np.zeros((h, w, 3), np.uint8), bboxes=np.zeros((0, 4)), labels=[])["image"]
            assert out.shape[:2] == want


def test_export_graph_resize_is_the_rule_under_torch_export():
    """The export graph's symbolic sizes (torch.export, dynamic H and W) equal `resized_size`."""

    class Resize(torch.nn.Module):
        def forward(self, x):
            return F.interpolate(x, size=eval_size(x.shape[-2], x.shape[-1], 96, 160), mode="bilinear")

    dim = torch.export.Dim
    program = torch.export.export(Resize(), (torch.zeros(1, 1, 64, 80),),
                                  dynamic_shapes={"x": {2: dim("H", min=8, max=4096), 3: dim("W", min=8, max=4096)}})
    module = program.module()
    for h, w in SIZE_PAIRS[:24] + [(15, 25), (25, 15), (17, 9)]:
        if 8 <= min(h, w) and max(h, w) <= 4096 and min(resized_size(h, w, 96, 160)) >= 2:  # torch.export: no 0/1 sizes
            assert tuple(module(torch.zeros(1, 1, h, w)).shape[-2:]) == resized_size(h, w, 96, 160)


def test_size_groups_pad_each_image_alone():
    sizes = torch.tensor([[96, 128], [128, 96], [100, 120], [64, 64]])
    assert size_groups(sizes, 32) == [((96, 128), [0]), ((128, 96), [1]), ((128, 128), [2]), ((64, 64), [3])]
    assert size_groups(sizes, 128) == [((128, 128), [0, 1, 2, 3])]


@pytest.fixture(scope="module")
def tiny_predictor():
    torch.manual_seed(0)
    model = RetinaNet(3, backbone=ResNetBackbone(18, freeze_at=0), fpn_channels=32, num_convs=1,
                      postprocess=PostProcess(score_thresh=0.0, detections_per_img=30)).eval()
    return Predictor(model, InputSettings(64, 96, 32), [1, 5, 9], ["a", "b", "c"])


def test_an_image_answers_the_same_alone_and_in_any_batch(tiny_predictor):
    """The batch rule: detections do not depend on the other images of the batch."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in [(60, 90), (90, 60), (64, 64), (40, 100)]]
    together = tiny_predictor(images, batch_size=4)
    reversed_ = tiny_predictor(images[::-1], batch_size=3)[::-1]
    for i, image in enumerate(images):
        alone = tiny_predictor(image)[0]
        assert len(alone["scores"]) == 30
        for other in (together[i], reversed_[i]):
            torch.testing.assert_close(other["boxes"], alone["boxes"], atol=0.5, rtol=0)
            torch.testing.assert_close(other["scores"], alone["scores"], atol=1e-3, rtol=0)
            assert torch.equal(other["labels"], alone["labels"])
            assert other["category_ids"].tolist() == [[1, 5, 9][k] for k in alone["labels"].tolist()]


def test_thresholds_and_names_are_the_predictors(tiny_predictor, tmp_path):
    image = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    every = tiny_predictor(image)[0]
    cut = float(every["scores"].median())
    kept = tiny_predictor(image, score_threshold=cut)[0]
    assert len(kept["scores"]) == int((every["scores"] >= cut).sum()) and (kept["scores"] >= cut).all()
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps({"a": {"score": 2.0}, "b": {"score": 2.0}, "c": {"score": 0.0}}))
    only_c = tiny_predictor(image, score_threshold=str(path))[0]
    assert set(only_c["names"]) <= {"c"} and len(only_c["names"]) == int((every["labels"] == 2).sum())
    det = Detector(tiny_predictor.model, tiny_predictor.inputs, [1, 5, 9], ["a", "b", "c"], score_threshold=cut)
    assert len(det.predict(image)[0]["scores"]) == len(kept["scores"])


def test_tta_through_the_predictor_is_the_merge_of_its_views(tiny_predictor):
    """``predict(tta={"flip": True})`` = class-wise NMS over the plain and the mirrored image's
    detections (mirrored back); the TTA views run the same prepare -> model -> original pixels."""
    from focaldet.inference.slicing import merge_detections
    from focaldet.inference.tta import flip_boxes

    image = np.random.default_rng(3).integers(0, 255, (60, 90, 3), dtype=np.uint8)
    plain = tiny_predictor(image)[0]
    mirrored = tiny_predictor(np.ascontiguousarray(image[:, ::-1]))[0]
    views = [{k: plain[k] for k in ("boxes", "scores", "labels")},
             {"boxes": flip_boxes(mirrored["boxes"], 90), "scores": mirrored["scores"], "labels": mirrored["labels"]}]
    post = tiny_predictor.model.postprocess
    expected = merge_detections(views, post.nms_thresh, post.detections_per_img)
    got = tiny_predictor(image, tta={"flip": True})[0]
    torch.testing.assert_close(got["boxes"], expected["boxes"], atol=0.5, rtol=0)
    torch.testing.assert_close(got["scores"], expected["scores"], atol=1e-3, rtol=0)
    assert (got["boxes"][:, 2] <= 90 + 1e-3).all() and len(got["scores"]) == 30
    with pytest.raises(ConfigError, match="cannot be combined"):
        tiny_predictor(image, tta={"flip": True}, slicing={"size": 32})


def test_tta_flag_reaches_the_module_and_hands_over_originals(checkpoint, synth_coco):
    cli = _cli(["validate", "--ckpt_path", str(checkpoint), "--data.val_ann", str(synth_coco.val_ann),
                "--data.val_images", str(synth_coco.images), "--model.tta.flip", "true",
                "--model.tta.scales", "[64,96]"])
    assert cli.model.tta.flip is True and cli.model.tta.scales == (64, 96)
    assert cli.model.predictor.tta == cli.model.tta and cli.datamodule.eval_original_size is True
    assert "tta" not in cli.model.hparams  # an inference setting, not the recipe


# ---------------------------------------------------------------- the checkpoint is the default

def _checkpoint(path, synth_coco) -> None:
    """A random tiny model at 96/128 px with a recipe of its own (score_threshold 0.2)."""
    label_map = LabelMap.from_categories(json.loads(synth_coco.val_ann.read_text())["categories"]).to_dict()
    save_untrained_checkpoint(path, label_map, {"min_size": 96, "max_size": 128},
                              postprocess=PostProcess(score_thresh=0.0, detections_per_img=10),
                              prediction={"score_threshold": 0.2})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, synth_coco):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    _checkpoint(path, synth_coco)
    return path


def _cli(args):
    """The model and data ``main`` builds for ``args`` (a command with ``--ckpt_path``), not run
    (``run=False`` takes no command and no ``--ckpt_path``: the checkpoint's config stays first)."""
    args = _config_from_checkpoint(args)[1:]
    k = args.index("--ckpt_path")
    return FocaldetCLI(RetinaNetModule, CocoDataModule, args=args[:k] + args[k + 2:], run=False,
                       trainer_defaults={"logger": False})


def test_checkpoint_only_validate_uses_the_checkpoints_eval_size(checkpoint, synth_coco):
    cli = _cli(["validate", "--ckpt_path", str(checkpoint), "--data.val_ann", str(synth_coco.val_ann),
                "--data.val_images", str(synth_coco.images), "--data.num_workers", "0"])
    assert cli.datamodule.inputs == cli.model.inputs == InputSettings(96, 128, 128)  # not 800 / 1333
    assert cli.model.prediction.score_threshold == 0.2 and cli.model.model.postprocess.detections_per_img == 10
    assert cli.model.model.backbone.depth == 18


@pytest.mark.parametrize("flag,value,read", [
    ("--model.prediction.draw", "true", lambda cli: cli.model.prediction.draw is True),
    ("--model.prediction.score_threshold", "0.5", lambda cli: cli.model.prediction.score_threshold == 0.5),
    ("--model.evaluation.max_dets", "7", lambda cli: cli.model.evaluation.max_dets == 7),
    ("--model.model.postprocess.detections_per_img", "3",
     lambda cli: cli.model.model.postprocess.detections_per_img == 3),
    ("--data.min_size", "64", lambda cli: cli.datamodule.inputs.min_size == 64 == cli.model.inputs.min_size),
    ("--data.max_size", "100", lambda cli: cli.model.inputs.max_size == 100),
    ("--data.size_divisibility", "32", lambda cli: cli.model.inputs.size_divisibility == 32),
])
def test_a_typed_flag_beats_the_checkpoint(checkpoint, synth_coco, flag, value, read):
    cli = _cli(["predict", "--ckpt_path", str(checkpoint), "--data.predict_images", str(synth_coco.images), flag, value])
    assert read(cli)


def test_a_config_file_beats_the_checkpoint_and_flags_beat_both(checkpoint, synth_coco, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"prediction": {"score_threshold": 0.3}, "evaluation": {"max_dets": 9}},
                                   "data": {"min_size": 80}}))
    cli = _cli(["validate", "--ckpt_path", str(checkpoint), "-c", str(cfg), "--model.evaluation.max_dets", "11",
                "--data.val_ann", str(synth_coco.val_ann), "--data.val_images", str(synth_coco.images)])
    assert cli.model.prediction.score_threshold == 0.3 and cli.model.evaluation.max_dets == 11
    assert cli.model.inputs.min_size == 80 and cli.model.model.postprocess.detections_per_img == 10


def test_predict_uses_and_records_the_typed_flags(checkpoint, synth_coco, tmp_path, capsys):
    """The README's command: draw_predictions and score_threshold typed with --ckpt_path are
    used (pictures drawn, detections cut) and written to the run's config.yaml; a typed eval
    size other than the checkpoint's is said once."""
    out = tmp_path / "run"
    assert main(["predict", "--ckpt_path", str(checkpoint), "--data.predict_images", str(synth_coco.images),
                 "--data.num_workers", "0", "--trainer.default_root_dir", str(out), "--trainer.accelerator", "cpu",
                 "--model.prediction.draw", "true", "--model.prediction.score_threshold", "0.0", "--data.min_size", "112",
                 "--trainer.enable_progress_bar", "false"]) == 0
    err = capsys.readouterr().err
    assert err.count("focaldet: note: predict runs at min_size 112") == 1 and "min_size 96" in err
    config = yaml.safe_load(next(out.rglob("config.yaml")).read_text())
    assert config["model"]["prediction"] == {"score_threshold": 0.0, "draw": True, "draw_score_threshold": 0.3}
    assert config["data"]["min_size"] == 112 and config["model"]["model"]["init_args"]["postprocess"]["init_args"]["detections_per_img"] == 10
    assert len(list(out.rglob("predictions/*.png"))) == len(list(synth_coco.images.glob("*.png")) +
                                                         list(synth_coco.images.glob("*.jpg")))
    preds = json.loads(next(out.rglob("predictions.json")).read_text())
    assert min(p["score"] for p in preds) < 0.2  # the typed 0.0, not the checkpoint's 0.2


@pytest.mark.parametrize(("command", "flags"), [("validate", "--data.val_ann and --data.val_images"),
                                                 ("test", "--data.test_ann and --data.test_images"),
                                                 ("predict", "--data.predict_images")])
def test_a_checkpoint_without_data_is_a_one_line_error(checkpoint, command, flags, capsys):
    """A checkpoint records no dataset: ``validate --ckpt_path X`` alone used to evaluate nothing
    and exit 0, printing no mAP. Now it says what to give."""
    from focaldet.cli import main

    assert main([command, "--ckpt_path", str(checkpoint), "--trainer.enable_progress_bar", "false"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"focaldet: error: {command} has no data to run on: give {flags} (a checkpoint records the " \
                      "recipe, label map and eval size, not the dataset)"
