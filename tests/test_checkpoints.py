"""Corrupt, truncated and unwritable checkpoints: one line naming the file, ``last`` recovered,
a failed save leaves the previous file intact."""

import errno
import io
import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from focaldet.engine.checkpoints import (CheckpointWarning, FocaldetCheckpointIO, check_checkpoint, load_checkpoint_file,
                                  resolve_ckpt_path)
from focaldet.cli import main
from focaldet.errors import CheckpointError

from helpers import ckpt_dir, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _ckpt(step: int) -> dict:
    return {"state_dict": {"w": torch.full((64, 64), float(step))}, "global_step": step}


def _save(path: Path, step: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_ckpt(step), path)
    return path


def _damaged_pickle(good: bytes) -> bytes:
    """A valid zip (CRCs right) whose data.pkl is garbage: corruption a zip check misses."""
    src, out = zipfile.ZipFile(io.BytesIO(good)), io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                data = data[: len(data) // 3] + b"\x00garbage"
            dst.writestr(info, data)
    return out.getvalue()


CORRUPTIONS = {
    "truncated": lambda good: good[: len(good) // 2],
    "random_bytes": lambda good: os.urandom(len(good)),
    "zero_bytes": lambda good: b"",
    "damaged_pickle": _damaged_pickle,
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_a_corrupt_checkpoint_is_one_error_naming_the_file(tmp_path, kind):
    good = _save(tmp_path / "good.ckpt", 1).read_bytes()
    bad = tmp_path / f"{kind}.ckpt"
    bad.write_bytes(CORRUPTIONS[kind](good))
    with pytest.raises(CheckpointError) as err:
        check_checkpoint(bad)
    message = str(err.value)
    assert str(bad) in message and "\n" not in message
    with pytest.raises(CheckpointError):
        FocaldetCheckpointIO().load_checkpoint(bad)  # what Lightning calls to restore
    check_checkpoint(tmp_path / "good.ckpt")


def test_a_file_that_is_no_torch_save_says_so(tmp_path):
    """Neither a zip nor a pickle: no PyTorch hint about weights_only, which would mislead."""
    path = tmp_path / "notes.ckpt"
    path.write_bytes(b"hello, not a checkpoint")
    with pytest.raises(CheckpointError, match=r"notes.ckpt: not a readable PyTorch file \(neither a zip") as err:
        check_checkpoint(path)
    assert "weights_only" not in str(err.value)


def test_not_a_lightning_checkpoint(tmp_path):
    path = tmp_path / "weights.ckpt"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="no 'state_dict'"):
        load_checkpoint_file(path)


def test_last_falls_back_to_the_newest_readable_checkpoint(tmp_path):
    folder = tmp_path / "checkpoints"
    _save(folder / "step-2.ckpt", 2)
    newest = _save(folder / "step-4.ckpt", 4)
    last = folder / "last.ckpt"
    last.write_bytes(newest.read_bytes()[:1000])  # a copy cut short (full disk)
    os.utime(folder / "step-2.ckpt", (1, 1))  # oldest
    with pytest.warns(CheckpointWarning) as warned:
        assert resolve_ckpt_path("last", folder) == str(newest)
    assert str(last) in str(warned[0].message) and str(newest) in str(warned[0].message)
    shutil.copy(newest, last)  # a readable last.ckpt wins
    assert resolve_ckpt_path("last", folder) == str(last)


def test_last_refuses_when_no_checkpoint_is_readable(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(b"")
    (folder / "step-2.ckpt").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(CheckpointError, match="no readable checkpoint") as err:
        resolve_ckpt_path("last", folder)
    assert "last.ckpt" in str(err.value) and "step-2.ckpt" in str(err.value)


def test_last_without_any_last_checkpoint_is_left_to_lightning(tmp_path):
    assert resolve_ckpt_path("last", tmp_path / "nowhere") == "last"
    assert resolve_ckpt_path(None, tmp_path) is None
    assert resolve_ckpt_path("best", tmp_path) == "best"


def _disk_full_after(monkeypatch, ok_saves: int) -> list:
    """torch.save writes half its bytes and fails with ENOSPC after ``ok_saves`` good saves."""
    real, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) <= ok_saves:
            return real(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real(obj, buffer)
        f.write(buffer.getvalue()[: buffer.tell() // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save)
    return calls


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    io_ = FocaldetCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io_.save_checkpoint(_ckpt(1), path)
    _disk_full_after(monkeypatch, ok_saves=0)
    with pytest.raises(CheckpointError, match="No space left on device") as err:
        io_.save_checkpoint(_ckpt(2), path)
    assert str(path) in str(err.value)
    monkeypatch.undo()
    assert load_checkpoint_file(path)["global_step"] == 1  # the old file, whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary left behind


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synth_coco):
    """A tiny run with checkpoints after steps 2 and 4 (and last.ckpt)."""
    root = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(root, synth_coco, **{"trainer.max_steps": 4, "trainer.limit_val_batches": 0})
    every = root / "every2.yaml"
    every.write_text("trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
                     "      init_args: {every_n_train_steps: 2, save_top_k: -1, save_last: true, filename: 'step-{step}'}\n")
    assert main(["fit", "-c", str(cfg), "-c", str(every)]) == 0
    return root, cfg, every


def _copy_run(trained, tmp_path):
    root, cfg, every = trained
    shutil.copytree(root / "run", tmp_path / "run")
    text = cfg.read_text().replace(str(root / "run"), str(tmp_path / "run"))
    (tmp_path / "tiny.yaml").write_text(text)
    return tmp_path / "tiny.yaml", every, ckpt_dir(tmp_path / "run")


@pytest.mark.slow
@pytest.mark.parametrize("command", ["fit", "validate", "test", "predict"])
def test_every_command_names_a_corrupt_ckpt_path_in_one_line(trained, tmp_path, synth_coco, command, capsys):
    cfg, _, folder = _copy_run(trained, tmp_path)
    bad = tmp_path / "half.ckpt"
    bad.write_bytes((folder / "last.ckpt").read_bytes()[:5000])
    extra = {"test": ["--data.test_ann", str(synth_coco.val_ann), "--data.test_images", str(synth_coco.images)],
             "predict": ["--data.predict_images", str(synth_coco.images)]}.get(command, [])
    capsys.readouterr()
    assert main([command, "-c", str(cfg), "--ckpt_path", str(bad), *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("focaldet: error: checkpoint ") and str(bad) in err[-1]
    assert not any("Traceback" in line for line in err)


@pytest.mark.slow
def test_resume_last_with_a_corrupt_last_ckpt(trained, tmp_path):
    cfg, every, folder = _copy_run(trained, tmp_path)
    good = folder / "step-step=4.ckpt" if (folder / "step-step=4.ckpt").exists() else max(
        folder.glob("step-*.ckpt"), key=lambda p: p.stat().st_mtime)
    for last in folder.glob("last*.ckpt"):  # last.ckpt and last-v1.ckpt (two ModelCheckpoints save_last)
        last.write_bytes(os.urandom(4096))
    with pytest.warns(CheckpointWarning, match="last.ckpt is truncated or corrupt; resuming from"):
        assert main(["fit", "-c", str(cfg), "-c", str(every), "--trainer.max_steps", "6", "--ckpt_path", "last"]) == 0
    resumed = ckpt_dir(tmp_path / "run")  # the resumed run's own folder (version_1)
    assert resumed != folder and resumed.parent.name == "version_1"
    newest = max(resumed.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
    assert load_checkpoint_file(newest)["global_step"] == 6  # resumed at 4, trained to 6
    assert load_checkpoint_file(good)["global_step"] == 4


@pytest.mark.slow
def test_disk_full_during_fit_stops_with_one_line_and_keeps_last(trained, tmp_path, monkeypatch, capsys):
    cfg, every, folder = _copy_run(trained, tmp_path)
    lasts = {p: load_checkpoint_file(p)["global_step"] for p in folder.glob("last*.ckpt")}
    _disk_full_after(monkeypatch, ok_saves=0)
    capsys.readouterr()
    status = main(["fit", "-c", str(cfg), "-c", str(every), "--trainer.max_steps", "6", "--ckpt_path", "last"])
    monkeypatch.undo()
    assert status == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("focaldet: error: could not save checkpoint ") and "No space left on device" in err[-1]
    assert str(tmp_path / "run" / "lightning_logs" / "version_1" / "checkpoints") in err[-1]  # the resumed run's
    assert {p: load_checkpoint_file(p)["global_step"] for p in folder.glob("last*.ckpt")} == lasts  # intact
    assert not list((tmp_path / "run").rglob(".*.tmp"))


def test_last_before_any_last_ckpt_uses_the_newest_checkpoint(tmp_path):
    folder = tmp_path / "checkpoints"
    step2 = _save(folder / "step-2.ckpt", 2)
    (folder / ".last.ckpt.abc123.tmp").write_bytes(b"half")  # killed while writing the first last.ckpt
    with pytest.warns(CheckpointWarning, match="no last.ckpt"):
        assert resolve_ckpt_path("last", folder) == str(step2)


def test_a_save_replaces_stale_temporaries_and_keeps_the_usual_permissions(tmp_path):
    path = tmp_path / "last.ckpt"
    (tmp_path / ".last.ckpt.old.tmp").write_bytes(b"left by a killed save")
    FocaldetCheckpointIO().save_checkpoint(_ckpt(3), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
    assert load_checkpoint_file(path)["global_step"] == 3


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    """`focaldet.atomic.atomic_write` (every atomic write's one home): a writer that raises
    leaves the old contents and no temporary file; one that ends puts the new contents in place
    with open()'s permissions."""
    from focaldet.atomic import atomic_write

    path = tmp_path / "sub" / "results.json"
    with atomic_write(path) as f:
        f.write("old")
    with pytest.raises(RuntimeError), atomic_write(path) as f:
        f.write("half of the new")
        raise RuntimeError("killed")
    assert path.read_text() == "old" and sorted(p.name for p in path.parent.iterdir()) == ["results.json"]
    with atomic_write(path, "wb", fsync=True) as f:
        f.write(b"new")
    mask = os.umask(0)
    os.umask(mask)
    assert path.read_bytes() == b"new" and path.stat().st_mode & 0o777 == 0o666 & ~mask
