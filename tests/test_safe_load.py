"""Files from a stranger never run code: a pickle-payload checkpoint, a recipe naming
``subprocess.run``, a ``.pt2`` with a pickled payload and a config naming an arbitrary module
are refused, in one line naming the file, through every entry point; a marker file the
payload would write never appears. Recipes record public class paths; old ones still load."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

import focaldet
from focaldet.api import read_checkpoint
from focaldet.engine.checkpoints import FocaldetCheckpointIO, check_checkpoint, resolve_ckpt_path
from focaldet.errors import ConfigError
from focaldet.models import ResNetBackbone
from focaldet.config.recipe import describe, instantiate
from focaldet.config.safe_load import UnsafeFileError, check_pt2, load_torch_file

from helpers import run_cli, run_cli_sequence, save_untrained_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore")

DATA = Path(__file__).parent / "data"
LABEL_MAP = {"cat_ids": [1, 3], "names": ["a", "b"]}
INPUTS = {"min_size": 64, "max_size": 64, "size_divisibility": 32, "eval_transforms": None}


def tiny_checkpoint(path: Path, cls_loss: dict | None = None, hyper_parameters: dict | None = None) -> Path:
    """A focaldet checkpoint of a ~0.5 M-parameter model, no training; ``cls_loss`` replaces
    its recipe's class loss, ``hyper_parameters`` its whole recipe (an old format's)."""
    def edit(recipe: dict) -> dict:
        recipe = recipe if hyper_parameters is None else hyper_parameters
        if cls_loss is not None:
            recipe["criterion"]["init_args"]["cls_loss"] = cls_loss
        return recipe

    return save_untrained_checkpoint(path, LABEL_MAP, INPUTS, fpn_channels=16, edit_recipe=edit)


class _Payload:
    """Unpickling this writes ``marker`` (what a hostile checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    marker = tmp / "MARKER"
    good = tiny_checkpoint(tmp / "good.ckpt")
    evil_pickle = tmp / "evil_pickle.ckpt"
    ckpt = torch.load(good, weights_only=True)
    ckpt["callbacks"] = {"x": _Payload(marker)}
    torch.save(ckpt, evil_pickle)
    evil_recipe = tiny_checkpoint(tmp / "evil_recipe.ckpt", cls_loss={
        "class_path": "subprocess.run", "init_args": {"args": ["touch", str(marker)]}})
    evil_config = tmp / "evil.yaml"
    evil_config.write_text(yaml.safe_dump({"model": {"criterion": {"cls_loss": {
        "class_path": "subprocess.Popen", "init_args": {"args": ["touch", str(marker)]}}}}}))
    return {"tmp": tmp, "marker": marker, "good": good, "evil_pickle": evil_pickle, "evil_recipe": evil_recipe,
            "evil_config": evil_config}


def _one_line_naming(message: str, path: Path) -> None:
    assert str(path) in message and "\n" not in message.strip(), message
    assert "weights_only=False" not in message and "weights_only` set to `False" not in message


def test_a_pickle_payload_is_refused_by_every_loader(files):
    bad, marker = files["evil_pickle"], files["marker"]
    for load in (check_checkpoint, FocaldetCheckpointIO().load_checkpoint, read_checkpoint, focaldet.load,
                 lambda p: resolve_ckpt_path(str(p), p.parent),
                 lambda p: load_torch_file(p, f"weights {p}")):
        with pytest.raises(UnsafeFileError) as err:
            load(bad)
        _one_line_naming(str(err.value), bad)
        assert "asks for io.open" in str(err.value)  # what the pickle asked for
    assert not marker.exists()


def test_a_recipe_naming_subprocess_is_refused_before_import(files):
    bad, marker = files["evil_recipe"], files["marker"]
    for trust_code in (False,):
        with pytest.raises(UnsafeFileError, match=r"refused to build its criterion.cls_loss: subprocess.run is not") as err:
            focaldet.load(bad, device="cpu", trust_code=trust_code)
        _one_line_naming(str(err.value), bad)
    assert not marker.exists()


ENTRIES = ["validate", "predict", "predict_no_config", "export", "analyze", "serve"]


@pytest.fixture(scope="module")
def refusals(files, synth_coco, tmp_path_factory):
    """Each command on the pickle payload and on the hostile recipe, all in one fresh process
    (the marker would appear whichever process ran the payload): {entry: [result per file]}."""
    tmp = tmp_path_factory.mktemp("commands")
    cfg = tmp / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"trainer": {"accelerator": "cpu", "logger": False,
                                               "default_root_dir": str(tmp / "run")},
                                   "data": {"val_ann": str(synth_coco.val_ann), "val_images": str(synth_coco.images),
                                            "train_ann": str(synth_coco.train_ann),
                                            "train_images": str(synth_coco.images), "num_workers": 0}}))
    bads = (files["evil_pickle"], files["evil_recipe"])
    argvs = {entry: [{
        "validate": ["validate", "-c", str(cfg), "--ckpt_path", str(bad), "--weights_only", "true"],
        "predict": ["predict", "-c", str(cfg), "--ckpt_path", str(bad)],
        "predict_no_config": ["predict", "--ckpt_path", str(bad), "--data.predict_images", str(synth_coco.images)],
        "export": ["export", "--ckpt_path", str(bad), "--output", str(tmp / "m.onnx")],
        "analyze": ["analyze", "loss-distribution", "--ckpt_path", str(bad), "-c", str(cfg),
                    "--out", str(tmp / "ld.png")],
        "serve": ["serve", "--ckpt_path", str(bad), "--port", "0"],
    }[entry] for bad in bads] for entry in ENTRIES}
    results = iter(run_cli_sequence([a for entry in ENTRIES for a in argvs[entry]], timeout=300))
    return {entry: [(bad, next(results)) for bad in bads] for entry in ENTRIES}


@pytest.mark.slow
@pytest.mark.parametrize("entry", ENTRIES)
def test_every_command_refuses_the_crafted_files(files, refusals, entry):
    """Each command refuses the pickle payload and the hostile recipe in one line naming the file."""
    for bad, proc in refusals[entry]:
        lines = [line for line in proc.stderr.splitlines() if "refused" in line]
        assert proc.returncode != 0 and lines, proc.stderr[-2000:]
        assert str(bad) in lines[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not files["marker"].exists()


@pytest.mark.slow
def test_a_config_naming_an_arbitrary_module_is_never_imported(files, tmp_path):
    """The config names ``subprocess.Popen`` and a module beside it that would write the marker
    when imported: refused in one line naming the file, the module never imported."""
    marker = files["marker"]
    (tmp_path / "evil_module.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    cfg = tmp_path / "evil2.yaml"
    cfg.write_text("model:\n  model:\n    backbone:\n      class_path: evil_module.Backbone\n")
    configs = (files["evil_config"], cfg)
    for config, proc in zip(configs, run_cli_sequence([["validate", "-c", str(c)] for c in configs], cwd=tmp_path,
                                                      timeout=120)):
        assert proc.returncode == 1, proc.stderr[-2000:]
        error = proc.stderr.strip().splitlines()[-1]
        assert error.startswith("focaldet: error: config ") and str(config) in error and "is not a class" in error
    assert not marker.exists()


def test_sweep_and_equal_budget_never_import_a_config_module(files, tmp_path, monkeypatch):
    """A config naming an importable module that writes the marker when imported: ``sweep``
    (which parses each cell's config to key it) and ``equal-budget`` refuse it in one line
    naming the file; the module is never imported. With ``--trust_checkpoint_code`` it is."""
    from focaldet.engine.runs import resolve_run_config
    from focaldet.tools import equal_budget, sweep

    marker = files["marker"]
    (tmp_path / "evil_sweep_module.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # importable, as from the working directory
    cfg = tmp_path / "evil3.yaml"
    cfg.write_text("model:\n  model:\n    backbone:\n      class_path: evil_sweep_module.Backbone\n")
    calls = [lambda: resolve_run_config([str(cfg)], ["--model.model.fpn_channels", "32"]),
             lambda: sweep.main(["-c", str(cfg), "--param", "model.model.fpn_channels=32,64", "--out", str(tmp_path / "sw")]),
             lambda: equal_budget.main(["-c", str(cfg), "--out", str(tmp_path / "eb")])]
    for call in calls:
        with pytest.raises(ConfigError, match=r"evil3.yaml: model.model.backbone.class_path evil_sweep_module.Backbone "
                                              r"is not a class focaldet imports"):
            call()
    assert not marker.exists() and "evil_sweep_module" not in sys.modules
    assert not (tmp_path / "sw").exists()  # refused before any cell
    # --trust_checkpoint_code (passed on to every run): the user's module is imported
    mine = tmp_path / "MINE"
    (tmp_path / "my_sweep_module.py").write_text(f"open({str(mine)!r}, 'w').close()\n")
    cfg.write_text("model:\n  model:\n    backbone:\n      class_path: my_sweep_module.Backbone\n")
    with pytest.raises(ConfigError, match="bad run arguments"):  # (the module has no Backbone)
        resolve_run_config([str(cfg)], ["--model.model.fpn_channels", "32", "--trust_checkpoint_code"])
    assert mine.exists()


def test_the_parser_itself_refuses_unknown_modules(files, tmp_path, monkeypatch):
    """A class path typed on the command line is refused by jsonargparse before import."""
    from focaldet.config.safe_load import import_policy
    from jsonargparse import ArgumentParser

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "evil_module2.py").write_text(f"open({str(files['marker'])!r}, 'w').close()\nclass M: pass\n")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--loss", type=torch.nn.Module)
    with import_policy():
        with pytest.raises(Exception, match="evil_module2"):
            parser.parse_args(["--loss", '{"class_path": "evil_module2.M"}'])
        parser.parse_args(["--loss", '{"class_path": "torch.nn.Identity"}'])  # allowed
    assert "evil_module2" not in sys.modules and not files["marker"].exists()


def test_trust_code_builds_a_user_class(files, tmp_path, monkeypatch):
    """A recipe naming the user's own loss loads with ``trust_code=True`` only."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "my_losses.py").write_text(
        "from focaldet.losses import SigmoidFocalLoss\nclass MyLoss(SigmoidFocalLoss):\n    pass\n")
    ckpt = tiny_checkpoint(tmp_path / "mine.ckpt", cls_loss={"class_path": "my_losses.MyLoss", "init_args": {}})
    with pytest.raises(UnsafeFileError, match="my_losses.MyLoss is not a class focaldet builds"):
        focaldet.load(ckpt, device="cpu")
    assert "my_losses" not in sys.modules
    det = focaldet.load(ckpt, device="cpu", trust_code=True)
    assert type(det.model).__name__ == "RetinaNet"


def test_instantiate_checks_the_expected_base():
    spec = {"class_path": "torch.nn.Identity", "init_args": {}}
    assert isinstance(instantiate(spec, torch.nn.Module), torch.nn.Identity)
    from focaldet.models import Matcher

    with pytest.raises(ConfigError, match="torch.nn.Identity is not a focaldet.modeling.matcher.Matcher"):
        instantiate(spec, Matcher)
    with pytest.raises(ConfigError, match="no class is expected here"):
        instantiate(spec, None)
    for path in ("os.system", "subprocess.run", "focaldet.bench.__main__.main", "builtins.eval"):
        with pytest.raises(ConfigError, match="is not a class focaldet builds"):
            instantiate({"class_path": path, "init_args": {}}, torch.nn.Module)
    with pytest.raises(ConfigError, match="is not a class"):
        instantiate({"class_path": "torchvision.models.resnet18", "init_args": {}}, torch.nn.Module)


def test_describe_records_public_paths():
    assert describe(ResNetBackbone(depth=18))["class_path"] == "focaldet.models.ResNetBackbone"
    from focaldet.losses import GIoULoss, SigmoidFocalLoss

    assert describe(SigmoidFocalLoss())["class_path"] == "focaldet.losses.SigmoidFocalLoss"
    assert describe(GIoULoss())["class_path"] == "focaldet.losses.GIoULoss"


def test_an_old_format_recipe_still_loads(tmp_path):
    """tests/data/old_recipe.yaml: a recipe as focaldet recorded it in checkpoint format 2: 37 flat
    arguments, parts by their defining module (``focaldet.modeling.backbone.ResNetBackbone``,
    ``focaldet.losses.focal...``). It loads, through ``focaldet.load`` and ``--ckpt_path``, as parts."""
    from focaldet.api import build_module, checkpoint_config, read_checkpoint
    from focaldet.config.migrate import upgrade_recipe
    from focaldet.engine.runs import resolve_run_config

    old = yaml.safe_load((DATA / "old_recipe.yaml").read_text())
    assert old["backbone"]["class_path"] == "focaldet.modeling.backbone.ResNetBackbone" and old["base_lr"] == 0.002
    ckpt = tiny_checkpoint(tmp_path / "old.ckpt", hyper_parameters=old)
    ckpt_data = torch.load(ckpt, weights_only=True)
    ckpt_data["focaldet"]["format"] = 2
    torch.save(ckpt_data, ckpt)
    det = focaldet.load(ckpt, device="cpu")
    assert type(det.model.postprocess).__name__ == "PostProcess" and det.model.postprocess.score_thresh == 0.2
    out = det.predict(torch.rand(3, 64, 64))
    assert len(out) == 1
    module = build_module(read_checkpoint(ckpt))
    assert module.prediction.score_threshold == 0.25 and module.evaluation.max_dets == 7
    assert module.criterion.crowd_ioa_threshold == 0.5 and not module.decay_norm_and_bias
    optimizer = module.configure_optimizers()["optimizer"]
    assert type(optimizer).__name__ == "AdamW" and optimizer.defaults["weight_decay"] == 0.05
    scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert (scheduler.warmup_iters, scheduler.milestones, scheduler.gamma) == (100, [600, 750], 0.1)
    config = tmp_path / "from_checkpoint.yaml"  # what `--ckpt_path old.ckpt` puts first on the command line
    config.write_text(checkpoint_config(ckpt))
    resolved = yaml.safe_load(resolve_run_config([str(config)]))["model"]
    assert resolved["optimizer"]["class_path"] == "torch.optim.AdamW"
    assert resolved["lr_scheduler"]["init_args"]["milestones"] == [600, 750]
    new = upgrade_recipe(old)
    assert new["model"]["init_args"]["fpn_channels"] == 16 and new["optimizer"]["init_args"]["lr"] == 0.002
    assert upgrade_recipe(new) == new  # a current recipe is left as it is


def _pt2(path: Path) -> Path:
    class M(torch.nn.Module):
        def forward(self, x):
            return x + 1

    torch.export.save(torch.export.export(M(), (torch.rand(1, 3),)), path)
    return path


def _with_member(src: Path, dst: Path, suffix: str, data: bytes) -> Path:
    """A copy of the archive ``src`` with the member ending in ``suffix`` replaced (or added)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        names = zin.namelist()
        top = names[0].split("/", 1)[0]
        for name in names:
            if not name.endswith(suffix):
                zout.writestr(name, zin.read(name))
        zout.writestr(next((n for n in names if n.endswith(suffix)), f"{top}/{suffix}"), data)
    return dst


@pytest.mark.slow
def test_a_pt2_with_a_pickled_payload_is_refused(files, synth_coco, tmp_path):
    import pickle

    marker = files["marker"]
    good = _pt2(tmp_path / "good.pt2")
    check_pt2(good)
    evil = _with_member(good, tmp_path / "evil.pt2", "data/sample_inputs/model.pt", pickle.dumps(_Payload(marker)))
    so = _with_member(good, tmp_path / "aoti.pt2", "data/aotinductor/model/model.so", b"\x7fELF")
    for bad in (evil, so):
        with pytest.raises(UnsafeFileError) as err:
            check_pt2(bad)
        _one_line_naming(str(err.value), bad)
        from focaldet.export.core import load_torch_export

        with pytest.raises(UnsafeFileError):
            load_torch_export(bad)
    proc = run_cli("export", "evaluate", str(evil), "--val_ann", str(synth_coco.val_ann),
                   "--val_images", str(synth_coco.images), timeout=120)
    assert proc.returncode != 0 and str(evil) in proc.stderr and "refused" in proc.stderr, proc.stderr[-2000:]
    assert not marker.exists()
    # a .pt2 the user trusts is read as torch reads it (the payload then runs: that is what trust means)
    from focaldet.export.core import load_torch_export

    load_torch_export(good, trust_code=True)


def test_a_weights_file_with_a_payload_is_refused(files, tmp_path):
    from focaldet.modeling.weights import read_weights_file

    with pytest.raises(UnsafeFileError) as err:
        read_weights_file(files["evil_pickle"])
    _one_line_naming(str(err.value), files["evil_pickle"])
    assert not files["marker"].exists()
