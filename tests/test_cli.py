"""`focaldet fit|validate|test|predict` end to end, in-process, on a tiny synthetic set."""

import json
from pathlib import Path

import pytest
import torch
from pycocotools.coco import COCO

from focaldet.cli import main, run
from focaldet.errors import DataError, NonFiniteLossError
from focaldet.failures import one_line
from focaldet.losses import RetinaNetCriterion

from helpers import ckpt_dir, first_batch_error, run_cli, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore")


def _latest_version(run: Path) -> Path:
    return max((run / "lightning_logs").iterdir(), key=lambda p: int(p.name.split("_")[1]))


def fit_validate_test_predict(out: Path, synth, done: dict) -> dict:
    """The tiny config's fit, then validate, test (every candidate kept, 5 per image) and
    predict (drawn) of its last checkpoint: a background job (tests/background.py). What
    validate printed, and the folders of test and predict."""
    import contextlib
    import io

    cfg = tiny_config(out, synth)
    run = out / "run"
    assert main(["fit", "-c", str(cfg)]) == 0
    validate = io.StringIO()
    with contextlib.redirect_stdout(validate):
        assert main(["validate", "-c", str(cfg), "--ckpt_path", "last"]) == 0
    low_thresh = out / "low_thresh.yaml"  # an undertrained model: keep every candidate
    low_thresh.write_text("model:\n  model:\n    postprocess:\n      class_path: focaldet.models.PostProcess\n"
                          "      init_args: {score_thresh: 0.0, detections_per_img: 5}\n")
    assert main(["test", "-c", str(cfg), "-c", str(low_thresh), "--ckpt_path", "last", "--data.test_ann",
                 str(synth.val_ann), "--data.test_images", str(synth.images)]) == 0
    tested = _latest_version(run)
    assert main(["predict", "-c", str(cfg), "-c", str(low_thresh), "--ckpt_path", "last",
                 "--data.predict_images", str(synth.images), "--model.prediction.draw", "true"]) == 0
    return {"run": str(run), "validate_out": validate.getvalue(), "test": str(tested),
            "predict": str(_latest_version(run))}


@pytest.mark.slow  # trains (a fit), exports or starts a process: see docs/testing.md
def test_fit_validate_test_predict(cli_run, synth_coco):
    run = Path(cli_run["run"])
    ckpts = sorted(p.name for p in ckpt_dir(run).iterdir())
    assert "last.ckpt" in ckpts and any(n.startswith("best-") for n in ckpts)

    ckpt = torch.load(ckpt_dir(run) / "last.ckpt", map_location="cpu", weights_only=False)
    meta = ckpt["focaldet"]
    assert meta["label_map"]["cat_ids"] == [1, 3, 7, 8]  # non-contiguous ids travel with the model
    assert "SigmoidFocalLoss" not in meta["config"] and "train_ann" in meta["config"]
    assert ckpt["hyper_parameters"]["num_classes"] == 4  # linked from the data, never typed

    out = cli_run["validate_out"]
    assert "COCO bbox evaluation (val" in out and "AP50" in out
    for name in ("circle", "square", "triangle", "cross"):
        assert name in out  # per-class table

    version = Path(cli_run["test"])
    results = json.loads((version / "test_detections.json").read_text())
    assert len(results) == 5 * len(COCO(str(synth_coco.val_ann)).getImgIds())  # 5 per image
    COCO(str(synth_coco.val_ann)).loadRes(str(version / "test_detections.json"))  # valid COCO results
    assert {r["category_id"] for r in results} <= {1, 3, 7, 8}
    version = Path(cli_run["predict"])
    preds = json.loads((version / "predictions.json").read_text())
    assert preds and {"file_name", "category_name", "bbox", "score"} <= set(preds[0])
    pngs = list((version / "predictions").glob("*.png"))
    assert len(pngs) == len(list(Path(synth_coco.images).glob("*.jpg")))


@pytest.mark.slow  # trains (a fit), exports or starts a process: see docs/testing.md
def test_fit_prints_the_training_speed(tmp_path, synth_coco, capsys):
    cfg = tiny_config(tmp_path, synth_coco, **{"trainer.max_steps": 8, "trainer.val_check_interval": 4})
    main(["fit", "-c", str(cfg)])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("training speed:")]
    assert len(lines) == 1 and lines[0].endswith(" images/s over steps 6-8 (1 process(es), validation excluded)")


def test_training_speed_leaves_validation_out(capsys):
    import time
    from types import SimpleNamespace

    from focaldet.cli import TrainingSpeed
    trainer = SimpleNamespace(world_size=2, is_global_zero=True, state=SimpleNamespace(fn="fit"))
    module = SimpleNamespace(device=torch.device("cpu"))
    speed = TrainingSpeed(warmup=1)
    speed.on_train_start(trainer, module)
    for step in range(3):
        speed.on_train_batch_end(trainer, module, None, {"images": [0, 0, 0]}, step)
        speed.on_validation_start(trainer, module)
        time.sleep(0.1)  # validation: not training time
        speed.on_validation_end(trainer, module)
    speed.on_train_end(trainer, module)
    assert speed.images_per_second > 12 / 0.1  # 2 steps x 3 images x 2 processes, in far less than 0.1 s
    assert "images/s over steps 2-3 (2 process(es), validation excluded)" in capsys.readouterr().out


@pytest.mark.slow  # trains (a fit), exports or starts a process: see docs/testing.md
def test_fit_in_mixed_precision(tmp_path, synth_coco):
    """``--trainer.precision bf16-mixed`` (what a GPU run uses; CPU autocast here) trains,
    validates and checkpoints finite fp32 weights."""
    cfg = tiny_config(tmp_path, synth_coco, **{"trainer.max_steps": 4, "trainer.precision": "bf16-mixed"})
    main(["fit", "-c", str(cfg)])
    ckpt = torch.load(ckpt_dir(tmp_path / "run") / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4
    weights = [v for v in ckpt["state_dict"].values() if v.is_floating_point()]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights)
    metrics = (tmp_path / "run" / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "val/mAP" in metrics.splitlines()[0]


@pytest.mark.slow  # trains (a fit), exports or starts a process: see docs/testing.md
def test_loss_swapped_on_the_command_line(tmp_path, synth_coco):
    cfg = tiny_config(tmp_path, synth_coco, **{"trainer.max_steps": 1, "trainer.limit_val_batches": 0})
    main(["fit", "-c", str(cfg), "--model.criterion.cls_loss", "focaldet.losses.SoftmaxFocalLoss"])
    state = torch.load(ckpt_dir(tmp_path / "run") / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert state["model.head.cls_logits.weight"].shape[0] == 9 * 5  # K + 1 logits per anchor


def test_print_config(tmp_path, synth_coco, capsys):
    cfg = tiny_config(tmp_path, synth_coco)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "-c", str(cfg), "--print_config"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "focaldet.models.ResNetBackbone" in out and "train_ann" in out


@pytest.mark.slow  # trains (a fit), exports or starts a process: see docs/testing.md
@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_non_finite_loss(tmp_path, synth_coco, monkeypatch, mode):
    real = RetinaNetCriterion.forward

    def nan_at_step_one(self, outputs, boxes, labels, *args, **kwargs):
        losses = real(self, outputs, boxes, labels, *args, **kwargs)
        if self.calls == 1:
            losses["loss"] = losses["loss"] * float("nan")
        self.calls += 1
        return losses

    monkeypatch.setattr(RetinaNetCriterion, "calls", 0, raising=False)
    monkeypatch.setattr(RetinaNetCriterion, "forward", nan_at_step_one)
    cfg = tiny_config(tmp_path, synth_coco, **{"trainer.max_steps": 3, "trainer.limit_val_batches": 0})
    if mode == "raise":
        with pytest.raises(NonFiniteLossError, match="non-finite loss at step 1"):
            run(["fit", "-c", str(cfg)])
    else:
        main(["fit", "-c", str(cfg), "--model.nonfinite", "skip"])
        ckpt = torch.load(ckpt_dir(tmp_path / "run") / "last.ckpt", map_location="cpu", weights_only=False)
        assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_data_subcommand_is_wired(tmp_path):
    assert main(["data", "synth", "--out", str(tmp_path / "s"), "--num-images", "4", "--size", "64"]) == 0
    assert (tmp_path / "s" / "annotations" / "instances_train.json").is_file()


@pytest.mark.parametrize("command", ["fit", "validate"])
@pytest.mark.parametrize("fault", ["missing", "malformed"])
def test_a_data_error_is_one_line_without_traceback(tmp_path, synth_coco, capsys, monkeypatch, command, fault):
    bad = tmp_path / "instances_val.json"
    if fault == "malformed":
        bad.write_text('{"images": [{"id": 1, "file_name": "a.jpg",')  # cut short
    cfg = tiny_config(tmp_path, synth_coco, **{"data.val_ann": str(bad)})
    capsys.readouterr()
    assert main([command, "-c", str(cfg)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("focaldet: error: ") and str(bad) in err[0], err
    monkeypatch.setenv("FOCALDET_DEBUG", "1")  # the traceback, for a developer
    with pytest.raises(DataError):
        main([command, "-c", str(cfg)])


class _FailsInAWorker(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise DataError(f"annotation 7 of image 3 (images/x.jpg): bbox [1, 2, nan, 4] is not finite, item {i}")


def test_a_worker_error_is_unwrapped_to_its_own_line():
    error = first_batch_error(torch.utils.data.DataLoader(_FailsInAWorker(), num_workers=1))
    assert isinstance(error, DataError)
    assert "Original Traceback" in str(error)  # how PyTorch delivers it
    assert one_line(error) == ("annotation 7 of image 3 (images/x.jpg): bbox [1, 2, nan, 4] is not finite, "
                                   "item 0 [DataLoader worker process 0]")
    assert one_line(DataError("plain\nsecond line")) == "plain second line"


@pytest.mark.slow
def test_the_command_prints_one_line_and_exits_non_zero(tmp_path, synth_coco):
    cfg = tiny_config(tmp_path, synth_coco, **{"data.train_ann": str(tmp_path / "nope.json")})
    proc = run_cli("fit", "-c", str(cfg))
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("focaldet: error: ") and "nope.json" in err[-1]
    assert "Traceback" not in proc.stderr


def test_the_parser_is_built_for_the_subcommand_the_command_line_runs():
    """Only that subcommand's parser is built (`FocaldetCLI.subcommands`), found past ``-c FILE``."""
    from focaldet.engine.lightning_cli import _subcommand_of

    assert _subcommand_of(["fit", "-c", "a.yaml"]) == "fit"
    assert _subcommand_of(["-c", "fit", "validate", "--ckpt_path", "last"]) == "validate"
    assert _subcommand_of(["--config", "x.yaml"]) is None and _subcommand_of([]) is None
