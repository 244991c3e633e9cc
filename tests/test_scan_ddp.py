"""One image scan per job under torch.distributed (focaldet/data/scan.py): 2 CPU processes
(gloo) set up the data module; every image is decoded once across the ranks, both ranks get
the same scan as one process, the cache is written once, and a second job decodes nothing."""

import json

import pytest

from focaldet.data.scan import scan_images


def _worker(rank, world, init_file, synth, cache, out_dir):
    import os

    import torch.distributed as dist

    import focaldet.data.scan as scan

    os.environ["FOCALDET_CACHE"] = str(cache)
    decoded, real = [], scan.scan_image

    def counting(path):
        decoded.append(os.path.basename(path))
        return real(path)

    scan.scan_image = counting
    saves, real_save = [], scan._save_cache
    scan._save_cache = lambda root, files: (saves.append(len(files)), real_save(root, files))
    # Lightning (and torchmetrics) first: imported after init, their `group=dist.group.WORLD`
    # defaults would keep the process group (and gloo's threads) alive past destroy_process_group,
    # into interpreter shutdown, where a gloo thread freeing a finished collective aborts the
    # process about one run in ten ("terminate called without an active exception").
    from focaldet.data import CocoDataModule

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        dm = CocoDataModule(train_ann=str(synth.train_ann), train_images=str(synth.images),
                            val_ann=str(synth.val_ann), val_images=str(synth.images), num_workers=0)
        dm.setup("fit")
        scanned = scan.scan_images(synth.images, sorted(r["file_name"] for r in dm.datasets["train"].records))
        (out_dir / f"{rank}.json").write_text(json.dumps({
            "decoded": decoded, "saves": saves, "train": len(dm.datasets["train"]),
            "scan": {n: s.size for n, s in scanned.items()}}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_decode_each_image_once(synth_coco, tmp_path):
    from warm import spawn

    names = sorted(p.name for p in synth_coco.images.iterdir())
    cache = tmp_path / "cache"
    for job in ("cold", "warm"):
        out = tmp_path / job
        out.mkdir()
        spawn(_worker, (2, tmp_path / f"init-{job}", synth_coco, cache, out), nprocs=2)
        ranks = [json.loads((out / f"{r}.json").read_text()) for r in range(2)]
        decoded = [n for r in ranks for n in r["decoded"]]
        if job == "cold":  # the train and val scans: every file once, both ranks did a share
            assert sorted(decoded) == names
            assert ranks[0]["decoded"] and ranks[1]["decoded"]
            assert ranks[0]["saves"] == [12, 16] and ranks[1]["saves"] == []  # train, + val; rank 0 only
        else:  # the cache the first job wrote: nothing decoded, nothing written
            assert decoded == [] and ranks[0]["saves"] == ranks[1]["saves"] == []
        assert ranks[0]["train"] == ranks[1]["train"] == 12
        single = scan_images(synth_coco.images, list(ranks[0]["scan"]), cache=False)
        assert ranks[0]["scan"] == ranks[1]["scan"] == {n: list(s.size) for n, s in single.items()}
