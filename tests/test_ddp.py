"""The multi-GPU code paths, exercised with 2 CPU processes (gloo)."""

import csv
import os
import socket
from pathlib import Path

import pytest
import torch

from focaldet.cli import main
from focaldet.data.synth import write_synthetic_coco

from helpers import ckpt_dir, tiny_config
from warm import start_cli

pytestmark = pytest.mark.slow
DDP = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"]


def _val_metrics(run: Path) -> dict[str, float]:
    rows = list(csv.DictReader((next((run / "lightning_logs").iterdir()) / "metrics.csv").open()))
    # val/loss averages over the sampler's padded repeats, so it may differ in DDP: the COCO
    # numbers and per-class AP are the exact ones
    return {k: float(v) for row in rows for k, v in row.items()
            if k.startswith("val/") and not k.startswith("val/loss") and v}


@pytest.fixture(scope="module")
def one_process_validation(tmp_path_factory):
    """A 5-image val set, its config and the metrics of validating it in one process."""
    tmp_path = tmp_path_factory.mktemp("val_one")
    # 5 val images: not a multiple of 2 processes x 2 images, so DistributedSampler repeats one
    data = write_synthetic_coco(tmp_path / "data", num_images=20, seed=3, num_classes=3, image_size=128,
                                val_fraction=0.25)
    low_thresh = tmp_path / "untrained.yaml"  # random weights: keep many candidates so metrics are > 0
    low_thresh.write_text("model:\n  model:\n    prior_prob: 0.2\n    postprocess:\n      class_path: focaldet.models.PostProcess\n"
                          "      init_args: {score_thresh: 0.0}\n")
    cfg = tiny_config(tmp_path / "one", data)
    assert main(["validate", "-c", str(cfg), "-c", str(low_thresh)]) == 0  # the reference: in this process
    metrics = _val_metrics(tmp_path / "one" / "run")
    assert len([k for k in metrics if k.count("/") == 1]) == 12 and metrics["val/AR100"] > 0
    return data, low_thresh, metrics


def test_validate_on_two_processes_equals_one(tmp_path, one_process_validation):
    data, low_thresh, one = one_process_validation
    cfg = tiny_config(tmp_path / "two", data)
    _torchrun("validate", "-c", str(cfg), "-c", str(low_thresh), *DDP)
    assert _val_metrics(tmp_path / "two" / "run") == one


def _torchrun(*args: str) -> None:
    """``focaldet ARGS`` on 2 ranks started as ``torchrun --nproc_per_node 2`` starts them (its
    environment variables; forked processes, `warm`): each must end with 0. Lightning's own
    launcher, which starts rank 1 as a fresh ``python .venv/bin/focaldet ARGS``, is
    `test_an_error_on_one_rank_ends_every_rank_with_its_message`'s."""
    port = str(_free_port())
    procs = [start_cli(*args, env={"TORCHELASTIC_RUN_ID": "focaldet-test", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": port, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
                                   "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0", "NODE_RANK": None})
             for rank in (0, 1)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for rank, (p, (_, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, (rank, err[-3000:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_of_one_process_equal_one_process(tmp_path, one_process_validation):
    """The multi-machine launch on one machine: 2 "nodes" (``--trainer.num_nodes 2
    --trainer.devices 1``), each started by hand with its NODE_RANK as a scheduler would,
    rendezvous on 127.0.0.1 and give the numbers of one process."""
    data, low_thresh, one = one_process_validation
    port = str(_free_port())
    procs = []
    for node in (0, 1):  # separate run folders, as on two machines
        cfg = tiny_config(tmp_path / f"node{node}", data)
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "NODE_RANK": str(node), "WORLD_SIZE": "2",
               "LOCAL_RANK": None}
        procs.append(start_cli("validate", "-c", str(cfg), "-c", str(low_thresh), "--trainer.num_nodes", "2",
                               "--trainer.devices", "1", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu",
                               env=env))
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outs[1][1] + outs[1][0]
    assert _val_metrics(tmp_path / "node0" / "run") == one


def test_one_step_two_processes_equals_one_process_two_images(tmp_path):
    """2 processes x 1 image == 1 process x 2 images: proves the all-reduced loss normaliser
    (and the linear lr scaling by global batch)."""
    data = write_synthetic_coco(tmp_path / "data", num_images=3, seed=5, num_classes=3, image_size=128,
                                val_fraction=0.34)  # 2 train images
    weights = {}
    for name, extra in [("one", ["--data.batch_size", "2"]), ("two", ["--data.batch_size", "1", *DDP])]:
        cfg = tiny_config(tmp_path / name, data, **{"trainer.max_steps": 1, "trainer.limit_val_batches": 0})
        args = ["fit", "-c", str(cfg), "--data.hflip_prob", "0", "--model.lr_scheduler.warmup_iters", "0",
                "--model.optimizer.lr", "0.5", *extra]  # a large lr makes the update dominate
        if name == "one":  # the reference: in this process
            assert main(args) == 0
        else:
            _torchrun(*args)
        ckpt = torch.load(ckpt_dir(tmp_path / name / "run") / "last.ckpt", map_location="cpu", weights_only=False)
        assert ckpt["global_step"] == 1
        weights[name] = ckpt["state_dict"]
    moved = 0.0
    for key, w1 in weights["one"].items():
        torch.testing.assert_close(weights["two"][key], w1, atol=1e-5, rtol=1e-4, msg=key)
        if key == "model.head.cls_logits.bias":
            moved = (w1 + 4.59512).abs().max().item()  # initial bias is -log(99)
    assert moved > 1e-3  # the step really changed the weights


def fail_on_one_rank(out: Path, synth, done: dict) -> dict:
    """Two 2-process fits through Lightning's launcher (rank 1 a fresh process), rank 1 of one
    and rank 0 of the other failing on a bad image at step 2, run at once (each waits seconds
    for its fresh rank 1): a background job (tests/background.py); each launch's exit code and
    stderr."""
    tests_dir = str(Path(__file__).parent)
    env = {"PYTHONPATH": os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")])}
    launches = {}
    try:
        for rank in (1, 0):
            cfg = tiny_config(out / f"rank{rank}", synth, **{"trainer.max_steps": 20, "trainer.limit_val_batches": 0})
            # a callback of the tests' own: outside focaldet's allow-list, so the run says it trusts it
            launches[rank] = start_cli("fit", "-c", str(cfg), *DDP, "--trust_checkpoint_code",
                                       "--trainer.callbacks+=faults.FailOnRank", f"--trainer.callbacks.rank={rank}",
                                       "--trainer.callbacks.step=2", env=env)
        results = {}
        for rank, launch in launches.items():
            proc = launch.result(90)
            results[str(rank)] = {"returncode": proc.returncode, "stderr": proc.stderr}
        return results
    finally:
        for launch in launches.values():
            launch.kill()


def test_an_error_on_one_rank_ends_every_rank_with_its_message(ddp_failures):
    """One rank alone hits a bad image mid-training while the other waits in the gradient
    all-reduce: both processes end within seconds (not the 30 min collective timeout) and the
    user reads the failing rank's one-line error, and no traceback (`fail_on_one_rank`)."""
    for rank in (1, 0):
        proc = ddp_failures[str(rank)]
        assert proc["returncode"] != 0, rank
        errors = [line for line in proc["stderr"].splitlines() if line.startswith("focaldet: error: ")]
        assert errors and set(errors) == {f"focaldet: error: cannot read image images/bad_on_rank{rank}.jpg: "
                                          "not a decodable image"}, proc["stderr"][-3000:]
        assert "Traceback" not in proc["stderr"], proc["stderr"][-3000:]
