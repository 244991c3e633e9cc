"""``focaldet.load`` / ``Detector``: the checkpoint rebuilds its model; predictions equal validate's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pycocotools.coco import COCO

import focaldet
from focaldet.cli import FocaldetCLI, main, trainer_defaults
from focaldet.data import CocoDataModule, read_image
from focaldet.errors import DataError, FocaldetError, WeightsError
from focaldet.evaluation import detections_to_coco, evaluate_coco
from focaldet.config.inputs import InputSettings
from focaldet.engine.module import RetinaNetModule

from artifacts import TINY_LOW_THRESH

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.slow]  # every test reads the shared trained run

@pytest.fixture(scope="module")
def trained(tiny_run):
    """The session's tiny run (tests/conftest.py `tiny_run`): 40 AdamW steps at 96-128 px (not
    the 800 px default), detections kept down to score 0.02 (30 per image). Read-only."""
    return tiny_run


def test_checkpoint_stores_recipe_label_map_and_inputs_once(trained):
    ckpt = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)
    hp, meta = ckpt["hyper_parameters"], ckpt["focaldet"]
    model, criterion = hp["model"]["init_args"], hp["criterion"]["init_args"]
    assert hp["model"]["class_path"] == "focaldet.models.RetinaNet"
    assert model["backbone"] == {"class_path": "focaldet.models.ResNetBackbone",
                                 "init_args": {"depth": 18, "norm": "frozen_bn", "freeze_at": 0, "weights": None}}
    assert TINY_LOW_THRESH["init_args"].items() <= model["postprocess"]["init_args"].items()
    assert not {"num_classes", "min_size", "background_logit"} & set(model)  # the module sets these
    assert criterion["cls_loss"] == {"class_path": "focaldet.losses.SigmoidFocalLoss",
                                     "init_args": {"alpha": 0.25, "gamma": 2.0, "compile": False, "normalizer": "num_pos"}}
    assert hp["optimizer"] == {"class_path": "torch.optim.AdamW", "init_args": hp["optimizer"]["init_args"]}
    assert hp["optimizer"]["init_args"]["lr"] == 0.001 and hp["lr_scheduler"]["init_args"]["warmup_iters"] == 5
    assert "label_map" not in hp and "inputs" not in hp
    assert meta["label_map"]["cat_ids"] == [1, 3, 7, 8]
    assert meta["inputs"] == {"min_size": 96, "max_size": 128, "size_divisibility": 128, "eval_transforms": None}
    assert "CocoDataModule" not in ckpt  # the data module no longer keeps a third copy
    # the run's config.yaml and stored config leave out what the module sets on the model itself
    # (RetinaNet's own defaults, min_size 800, would read as if they applied)
    written = next(trained["root"].rglob("config.yaml")).read_text()
    for text in (written, meta["config"]):
        model = yaml.safe_load(text)["model"]["model"]["init_args"]
        assert not {"min_size", "max_size", "size_divisibility", "background_logit"} & set(model)
        assert model["fpn_channels"] == 32 and yaml.safe_load(text)["data"]["min_size"] == 96


def test_module_predict_uses_the_data_eval_size(trained):
    cli = FocaldetCLI(RetinaNetModule, CocoDataModule, args=["-c", str(trained["cfg"])], run=False,
                      trainer_defaults={"logger": False})
    assert (cli.model.model.min_size, cli.model.model.max_size) == (96, 128)  # not 800 / 1333
    assert cli.model.inputs == cli.datamodule.inputs == InputSettings(96, 128, 128)


def test_load_rebuilds_the_model(trained):
    det = focaldet.load(trained["ckpt"], device="cpu")
    assert det.names == ["circle", "square", "triangle", "cross"] and det.category_ids == [1, 3, 7, 8]
    assert det.inputs == InputSettings(96, 128, 128) and det.device.type == "cpu"
    assert not det.model.training and det.model.min_size == 96
    state = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)["state_dict"]
    ours = det.model.state_dict()
    for k, v in state.items():
        if k.startswith("model."):
            torch.testing.assert_close(ours[k[len("model."):]], v, rtol=0, atol=0)


@pytest.mark.slow
def test_api_predictions_give_validate_map(trained, synth_coco, tmp_path):
    """One preprocessing: the API's detections on the val set, through COCOeval, give the
    mAP that `focaldet validate` reports, to 1e-6."""
    cli = FocaldetCLI(RetinaNetModule, CocoDataModule, trainer_defaults=trainer_defaults(),
                      args=["validate", "-c", str(trained["cfg"]), "--ckpt_path", str(trained["ckpt"]),
                            "--trainer.default_root_dir", str(tmp_path)])
    validate = cli.model.last_eval.stats
    det = focaldet.load(trained["ckpt"], device="cpu")
    gt = COCO(str(synth_coco.val_ann))
    ids = sorted(gt.getImgIds())
    paths = [synth_coco.images / gt.imgs[i]["file_name"] for i in ids]
    out = det.predict(paths, batch_size=3)
    assert sum(len(r["scores"]) for r in out) > 0
    results = detections_to_coco(ids, out, det.category_ids)
    version = max((tmp_path / "lightning_logs").iterdir(), key=lambda p: int(p.name.split("_")[1]))
    logged = json.loads((version / "val_detections.json").read_text())
    # the same detections, entry by entry; validate batches the images in twos, the API in
    # threes, so the padding (and a last float bit of a box, rounded to 3 decimals) may differ
    key = lambda r: (r["image_id"], r["category_id"], -r["score"], r["bbox"])  # noqa: E731
    ours, theirs = sorted(results, key=key), sorted(logged, key=key)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"]), (a, b)
        assert a["score"] == pytest.approx(b["score"], abs=2e-5) and a["bbox"] == pytest.approx(b["bbox"], abs=2e-3)
    api = evaluate_coco(gt, results).stats
    # A 4-step model's mAP may round to 0 on some thread counts: the entry-by-entry equality
    # above is the strong check; the 12 numbers must agree as well.
    for key in validate:
        assert api[key] == pytest.approx(validate[key], abs=1e-6), key
    r0 = out[0]
    assert r0["category_ids"].tolist() == [det.category_ids[i] for i in r0["labels"].tolist()]
    assert r0["names"] == [det.names[i] for i in r0["labels"].tolist()]


def test_predict_accepts_every_input_kind(trained, synth_coco, tmp_path):
    det = focaldet.load(trained["ckpt"], device="cpu")
    path = sorted(synth_coco.images.glob("*.jpg"))[0]
    rgb = read_image(path)
    as_path = det.predict(path)[0]
    for other in (det.predict(str(path)), det.predict(rgb), det.predict(Image.fromarray(rgb)),
                  det.predict(torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)):
        torch.testing.assert_close(other[0]["boxes"], as_path["boxes"])
        torch.testing.assert_close(other[0]["scores"], as_path["scores"])
    folder = det.predict(synth_coco.images, batch_size=5)
    assert len(folder) == len(list(synth_coco.images.glob("*.jpg")))
    assert as_path["boxes"].shape[1] == 4 and (as_path["boxes"][:, 2:] <= 128 + 1e-3).all()  # original pixels

    mixed = det.predict([path, rgb], score_threshold=0.5)
    assert all((r["scores"] >= 0.5).all() for r in mixed)
    per_class = det.predict(path, score_threshold={"circle": 1.1})[0]  # no circle passes 1.1
    assert 0 not in per_class["labels"].tolist()
    thresholds = tmp_path / "thresholds.json"
    thresholds.write_text(json.dumps({name: {"score": 1.1} for name in det.names}))
    assert len(det.predict(path, score_threshold=thresholds)[0]["scores"]) == 0


def test_bad_inputs_are_one_line_errors(trained, tmp_path):
    det = focaldet.load(trained["ckpt"], device="cpu")
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("hello")
    with pytest.raises(FocaldetError, match="notes.jpg"):
        det.predict(not_image)
    with pytest.raises(DataError, match="must be \\(H, W, 3\\) uint8"):
        det.predict(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(DataError, match="unknown classes \\['dog'\\]"):
        det.predict(np.zeros((8, 8, 3), np.uint8), score_threshold={"dog": 0.5})
    with pytest.raises(WeightsError, match="missing.ckpt: file not found"):
        focaldet.load(tmp_path / "missing.ckpt")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(trained["ckpt"].read_bytes()[:5000])
    with pytest.raises(WeightsError, match="truncated.ckpt: not a readable PyTorch file") as e:
        focaldet.load(truncated)
    assert "\n" not in str(e.value)
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(2)}, plain)
    with pytest.raises(WeightsError, match="plain.pt: not a focaldet checkpoint"):
        focaldet.load(plain)


def test_format_1_checkpoint_still_loads(trained, tmp_path):
    """Checkpoints written before the recipe was stored (format 1): flat arguments without the
    parts; the parts and sizes come from the run's config (flat too, as then)."""
    ckpt = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)
    parts = ("backbone", "anchor_generator", "matcher", "postprocess", "cls_loss", "box_loss")
    old = yaml.safe_load((Path(__file__).parent / "data" / "old_recipe.yaml").read_text())
    label_map = ckpt["focaldet"]["label_map"]
    ckpt["hyper_parameters"] = {**{k: v for k, v in old.items() if k not in parts},
                                "num_classes": 4, "fpn_channels": 32, "num_convs": 1, "label_map": label_map}
    backbone = {"class_path": "focaldet.modeling.backbone.ResNetBackbone",
                "init_args": {"depth": 18, "norm": "frozen_bn", "freeze_at": 0}}
    config = {"model": {"backbone": backbone, "postprocess": TINY_LOW_THRESH, "fpn_channels": 32, "num_convs": 1},
              "data": {"min_size": 96, "max_size": 128}}
    ckpt["focaldet"] = {"label_map": label_map, "config": yaml.safe_dump(config)}
    old_file = tmp_path / "old.ckpt"
    torch.save(ckpt, old_file)
    det = focaldet.load(old_file, device="cpu")
    assert det.inputs.min_size == 96 and det.model.postprocess.score_thresh == TINY_LOW_THRESH["init_args"]["score_thresh"]
    assert det.model.backbone.depth == 18
    reference = focaldet.load(trained["ckpt"], device="cpu")
    image = torch.rand(3, 100, 120)
    a, b = det.predict(image)[0], reference.predict(image)[0]
    torch.testing.assert_close(a["boxes"], b["boxes"])
    torch.testing.assert_close(a["scores"], b["scores"])


def test_predict_cli_needs_only_the_checkpoint(trained, synth_coco, tmp_path):
    out = tmp_path / "pred"
    main(["predict", "--ckpt_path", str(trained["ckpt"]), "--data.predict_images", str(synth_coco.images),
          "--trainer.default_root_dir", str(out), "--trainer.logger", "false", "--data.num_workers", "0"])
    preds = json.loads((out / "predictions.json").read_text())
    det = focaldet.load(trained["ckpt"], device="cpu")
    api = det.predict(synth_coco.images)
    assert len(preds) == sum(len(r["scores"]) for r in api) > 0
    assert {p["category_id"] for p in preds} <= {1, 3, 7, 8}
