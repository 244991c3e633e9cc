"""docs/own-data.md, "Train on your own data": its walkthrough commands, read from the page and
run as written, top to bottom, on a dataset of one COCO JSON (the tiny synthetic set merged),
in a folder laid out as the page says. The training commands get tiny sizes and steps added
(and no ImageNet download: the tests are offline). The commands run in a process of their own
while other tests run (the `walkthrough` background job); the test reads what they printed
and wrote."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import shutil
import warnings
from pathlib import Path

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


def run_walkthrough(root: Path, synth, done: dict) -> dict:
    """The page's commands in ``root``, as written, in a folder laid out as the page says:
    ``{"root", "num_images", "outputs"}`` (each command's stdout). A background job
    (tests/background.py): the test process asserts."""
    photos = root / "data" / "photos"
    photos.mkdir(parents=True)
    num_images = _one_json(synth, photos / "annotations.json")
    (photos / "images").symlink_to(synth.images)
    (root / "configs").symlink_to(REPO / "configs")
    (root / "new_photos").mkdir()
    for image in sorted(synth.images.glob("*.jpg"))[:3]:
        shutil.copy(image, root / "new_photos")
    commands = walkthrough_commands()
    assert [c[0] for c in commands] == ["data", "data", "fit", "validate", "predict", "export", "export"]
    outputs = []
    with contextlib.chdir(root), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for argv in commands:
            extra = TINY if argv[0] in ("fit", "validate", "predict") else []
            stdout = io.StringIO()
            with contextlib.redirect_stdout(stdout):
                status = main([*argv, *extra])
            assert status == 0, (argv, stdout.getvalue()[-3000:])
            outputs.append(stdout.getvalue())
    return {"root": str(root), "num_images": num_images, "outputs": outputs}


def test_the_walkthrough_runs_as_written(walkthrough):
    root, num_images = Path(walkthrough["root"]), walkthrough["num_images"]
    photos = root / "data" / "photos"
    check, split, _, validate, _, _, evaluate = walkthrough["outputs"]
    assert "anchor coverage" in check and "result: OK" in check
    parts = {s: json.loads((photos / "splits" / f"{s}.json").read_text()) for s in ("train", "val")}
    assert len(parts["val"]["images"]) == round(0.2 * num_images)
    assert len(parts["train"]["images"]) + len(parts["val"]["images"]) == num_images
    assert "COCO bbox evaluation (val" in validate
    runs = root / "runs" / "photos" / "lightning_logs"
    assert (runs / "version_0" / "checkpoints" / "last.ckpt").is_file()  # fit: the path export reads
    predictions = json.loads((runs / "version_2" / "predictions.json").read_text())  # predict: its own folder
    assert {p["file_name"] for p in predictions} <= {p.name for p in (root / "new_photos").iterdir()}
    assert (root / "photos.onnx").is_file()
    assert re.search(r"^mAP\s+\d\.\d{4}$", evaluate, re.M)
