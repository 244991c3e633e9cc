"""Kill a training process with SIGKILL mid-run and resume it."""

import signal
import time

import pytest
import torch

from focaldet.engine.checkpoints import resolve_ckpt_path

from helpers import ckpt_dir, run_cli, tiny_config
from warm import start_cli

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


def test_kill_and_resume(tmp_path, synth_coco):
    steps = 24
    cfg = tiny_config(tmp_path, synth_coco, **{"trainer.max_steps": steps, "trainer.limit_val_batches": 0})
    every = tmp_path / "every4.yaml"
    every.write_text("trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
                     "      init_args: {every_n_train_steps: 4, save_last: true, filename: 'step-{step}'}\n")
    killed_dir = tmp_path / "run" / "lightning_logs" / "version_0" / "checkpoints"  # the first run's own folder
    cmd = ["fit", "-c", str(cfg), "-c", str(every)]
    proc = start_cli(*cmd)  # a process of its own, to kill
    deadline = time.time() + 300
    while not any(killed_dir.glob("step-*.ckpt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # let it get somewhere between two checkpoints
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    for path in killed_dir.glob("*.ckpt"):  # every checkpoint on disk is complete (saves are atomic)
        torch.load(path, map_location="cpu", weights_only=False)
    # the kill may land while the first last.ckpt is written: "last" is then the newest step-*.ckpt
    resumable = resolve_ckpt_path("last", killed_dir)
    killed_at = torch.load(resumable, map_location="cpu", weights_only=False)["global_step"]
    assert 0 < killed_at < steps

    done = run_cli(*cmd, "--ckpt_path", "last")
    assert done.returncode == 0, done.stderr[-3000:]
    assert ckpt_dir(tmp_path / "run") != killed_dir  # the resumed run writes its own folder
    final = torch.load(ckpt_dir(tmp_path / "run") / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == steps
    assert "Restoring states from the checkpoint" in done.stderr + done.stdout
