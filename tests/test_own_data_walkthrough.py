"""docs/own-data.md, "Train on your own data": its walkthrough commands, read from the page and
run as written, top to bottom, on a dataset of one COCO JSON (the tiny synthetic set merged),
in a folder laid out as the page says. The training commands get tiny sizes and steps added
(and no ImageNet download: the tests are offline)."""

from __future__ import annotations

import json
import re
import shlex
import shutil

import pytest

from focaldet.cli import main

from helpers import REPO

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]

PAGE = REPO / "docs" / "own-data.md"
TINY = ["--model.model.backbone.weights", "null", "--model.model.fpn_channels", "32", "--model.model.num_convs", "1",
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--data.min_size", "96", "--data.max_size", "128",
        "--data.batch_size", "2", "--data.num_workers", "0"]


def walkthrough_commands() -> list[list[str]]:
    """The ``focaldet ...`` lines of the page's walkthrough block, split as a shell would."""
    block = re.search(r"<!-- walkthrough.*?```bash\n(.*?)```", PAGE.read_text(), re.S)
    assert block, f"{PAGE}: no walkthrough block"
    lines = [line.strip() for line in block.group(1).splitlines() if line.strip()]
    assert all(line.startswith("focaldet ") for line in lines)
    return [shlex.split(line)[1:] for line in lines]


def _one_json(synth, path):
    """The synthetic train and val JSONs as one file (annotation ids renumbered)."""
    train, val = (json.loads(p.read_text()) for p in (synth.train_ann, synth.val_ann))
    anns = [{**a, "id": i} for i, a in enumerate(train["annotations"] + val["annotations"], start=1)]
    path.write_text(json.dumps({"images": train["images"] + val["images"], "annotations": anns,
                                "categories": train["categories"]}))
    return len(train["images"]) + len(val["images"])


def test_the_walkthrough_runs_as_written(tmp_path, synth_coco, monkeypatch, capsys):
    photos = tmp_path / "data" / "photos"
    photos.mkdir(parents=True)
    num_images = _one_json(synth_coco, photos / "annotations.json")
    (photos / "images").symlink_to(synth_coco.images)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    (tmp_path / "new_photos").mkdir()
    for image in sorted(synth_coco.images.glob("*.jpg"))[:3]:
        shutil.copy(image, tmp_path / "new_photos")
    monkeypatch.chdir(tmp_path)

    commands = walkthrough_commands()
    assert [c[0] for c in commands] == ["data", "data", "fit", "validate", "predict", "export", "export"]
    outputs = []
    for argv in commands:
        extra = TINY if argv[0] in ("fit", "validate", "predict") else []
        capsys.readouterr()
        assert main([*argv, *extra]) == 0, argv
        outputs.append(capsys.readouterr().out)

    check, split, _, validate, _, _, evaluate = outputs
    assert "anchor coverage" in check and "result: OK" in check
    parts = {s: json.loads((photos / "splits" / f"{s}.json").read_text()) for s in ("train", "val")}
    assert len(parts["val"]["images"]) == round(0.2 * num_images)
    assert len(parts["train"]["images"]) + len(parts["val"]["images"]) == num_images
    assert "COCO bbox evaluation (val" in validate
    runs = tmp_path / "runs" / "photos" / "lightning_logs"
    assert (runs / "version_0" / "checkpoints" / "last.ckpt").is_file()  # fit: the path export reads
    predictions = json.loads((runs / "version_2" / "predictions.json").read_text())  # predict: its own folder
    assert {p["file_name"] for p in predictions} <= {p.name for p in (tmp_path / "new_photos").iterdir()}
    assert (tmp_path / "photos.onnx").is_file()
    assert re.search(r"^mAP\s+\d\.\d{4}$", evaluate, re.M)
