"""COCO at full size, simulated: what `CocoDataModule.setup("fit")` and the train loader cost.

Builds, in a temporary folder, a train JSON shaped like COCO train2017 (118,287 images of
640x480, ~7.3 boxes per image with 26-point polygons, 1 % crowd, the 80 COCO category ids
with their gaps) and a val JSON of 5,000 images, whose images are symbolic links to one
real 640x480 JPEG; then measures, each step in a fresh process:

- ``setup("fit")`` with an empty ``$FOCALDET_CACHE`` (every image decoded by the scan, the
  JSON parsed and validated): seconds and peak RSS;
- ``setup("fit")`` with the caches warm: seconds, peak RSS, and the annotation memory of the
  main process (its USS after ``setup`` minus its USS before, focaldet and torch imported);
- the train loader at 320 px (``--workers`` workers, batch 4): images/s, and each worker's
  PSS and private memory at the start and after ``--batches`` batches (0: a full epoch).

Usage: ``python scripts/coco_scale.py`` (full size; ~2 GB of JSON text in the temporary
folder, ~4 GB of RAM at the cold peak) or ``--images 2000`` for a quick look.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# COCO's 80 category ids (1..90 with gaps)
COCO_CAT_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
REPO = Path(__file__).resolve().parents[1]
DEFAULT_JPEG = REPO.parent / "shared" / "data" / "bccd" / "images" / "BloodImage_00000.jpg"


def write_split(path: Path, image_dir: Path, jpeg: Path, first_id: int, num_images: int, seed: int) -> int:
    """A COCO-shaped JSON of ``num_images`` 640x480 images linked to ``jpeg``; returns the box count."""
    rng = np.random.default_rng(seed)
    w, h = 640, 480
    counts = np.minimum(rng.poisson(7.3, num_images), 60)
    images, anns = [], []
    ann_id = 1 + first_id * 100
    for k in range(num_images):
        image_id = first_id + k
        name = f"{image_id:012d}.jpg"
        link = image_dir / name
        if not link.exists():
            os.symlink(jpeg, link)
        images.append({"license": 1, "file_name": name, "coco_url": f"http://images.cocodataset.org/{name}",
                       "height": h, "width": w, "date_captured": "2013-11-14 11:18:45", "flickr_url": "",
                       "id": image_id})
        n = int(counts[k])
        bw = rng.uniform(4, 300, n)
        bh = rng.uniform(4, 300, n)
        x = rng.uniform(0, w - bw)
        y = rng.uniform(0, h - bh)
        cats = rng.choice(COCO_CAT_IDS, n)
        crowd = rng.random(n) < 0.01
        angles = np.linspace(0, 2 * np.pi, 26, endpoint=False)  # (26,)
        px = (x + bw / 2)[:, None] + (bw / 2)[:, None] * np.cos(angles)  # (n, 26)
        py = (y + bh / 2)[:, None] + (bh / 2)[:, None] * np.sin(angles)
        polys = np.stack([px, py], axis=2).reshape(n, 52).round(2).tolist()  # (n, 26, 2) -> (n, 52) x, y, ...
        for j in range(n):
            anns.append({"segmentation": [polys[j]], "area": round(float(bw[j] * bh[j] * 0.78), 3),
                         "iscrowd": int(crowd[j]), "image_id": image_id,
                         "bbox": [round(float(v), 2) for v in (x[j], y[j], bw[j], bh[j])],
                         "category_id": int(cats[j]), "id": ann_id})
            ann_id += 1
    categories = [{"supercategory": "thing", "id": c, "name": f"class{c}"} for c in COCO_CAT_IDS]
    path.write_text(json.dumps({"info": {"description": "simulated COCO"}, "licenses": [], "images": images,
                                "annotations": anns, "categories": categories}))
    return len(anns)


# --------------------------------------------------------------------------------------
# Measurements, each in its own process
# --------------------------------------------------------------------------------------


def _memory(pid: str | int = "self") -> dict[str, float]:
    """MiB of ``/proc/<pid>/smaps_rollup``: rss, pss, uss (private clean + dirty)."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":")
        fields[key] = int(value.split()[0]) / 1024
    return {"rss": fields["Rss"], "pss": fields["Pss"], "uss": fields["Private_Clean"] + fields["Private_Dirty"]}


def _peak_rss_mib() -> float:
    """This process's peak RSS (``VmHWM``; ``ru_maxrss`` would start at the parent's RSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _datamodule(root: Path, workers: int):
    from focaldet.data import CocoDataModule

    return CocoDataModule(train_ann=str(root / "train.json"), train_images=str(root / "images"),
                          val_ann=str(root / "val.json"), val_images=str(root / "images"), batch_size=4,
                          num_workers=workers, min_size=320, max_size=533, persistent_workers=False)


def phase_setup(root: Path, workers: int) -> dict:
    import gc
    import warnings

    import torch  # noqa: F401 - imported before the baseline, as in training

    # the data module (and Lightning with it) before the baseline too, as in training:
    # focaldet.data imports it on first use, which would put Lightning's ~3.5 s import and
    # ~300 MiB of modules into the timed, measured setup
    from focaldet.data import CocoDataModule  # noqa: F401

    warnings.simplefilter("ignore")
    gc.collect()
    before = _memory()
    t, cpu = time.perf_counter(), time.process_time()
    dm = _datamodule(root, workers)
    dm.setup("fit")
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    gc.collect()
    after = _memory()
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mib": _peak_rss_mib(), "uss_mib": after["uss"],
            "annotation_mib": after["uss"] - before["uss"], "images": len(dm.datasets["train"])}


def phase_loader(root: Path, workers: int, batches: int) -> dict:
    import warnings

    warnings.simplefilter("ignore")
    dm = _datamodule(root, workers)
    dm.setup("fit")
    loader = dm.train_dataloader()
    total = len(loader) if batches <= 0 else min(batches, len(loader))
    it = iter(loader)
    next(it)
    pids = [w.pid for w in getattr(it, "_workers", [])]
    start = {pid: _memory(pid) for pid in pids}
    images, t = 0, time.perf_counter()
    for i, batch in enumerate(it, start=2):
        images += len(batch[0]) if isinstance(batch, (list, tuple)) else dm.batch_size
        if i >= total:
            break
    seconds = time.perf_counter() - t
    end = {pid: _memory(pid) for pid in pids}
    del it
    return {"batches": total, "images_per_s": images / seconds,
            "workers": [{"start": start[p], "end": end[p]} for p in pids]}


def _run_phase(args: list[str], env: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"phase {args[:2]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=118_287, help="train images (COCO train2017: 118,287)")
    p.add_argument("--val-images", type=int, default=None, help="val images (default: 5,000 at full size, scaled)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--batches", type=int, default=0, help="loader batches measured (0: a full epoch)")
    p.add_argument("--jpeg", type=Path, default=DEFAULT_JPEG, help="the one 640x480 JPEG every image links to")
    p.add_argument("--keep", type=Path, help="build (or reuse) the set in this folder instead of a temporary one")
    p.add_argument("--phase", choices=("setup", "loader"), help=argparse.SUPPRESS)
    p.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase == "setup":
        print(json.dumps(phase_setup(args.root, args.workers)))
        return
    if args.phase == "loader":
        print(json.dumps(phase_loader(args.root, args.workers, args.batches)))
        return

    with tempfile.TemporaryDirectory(prefix="coco_scale_") as tmp:
        root = args.keep or Path(tmp)
        (root / "images").mkdir(parents=True, exist_ok=True)
        val_images = args.val_images if args.val_images is not None else max(1, round(args.images * 5000 / 118_287))
        t = time.perf_counter()
        if not (root / "train.json").exists():
            boxes = write_split(root / "train.json", root / "images", args.jpeg.resolve(), 1, args.images, 0)
            write_split(root / "val.json", root / "images", args.jpeg.resolve(), 10**9, val_images, 1)
            print(f"built {args.images} train images ({boxes} boxes, "
                  f"{(root / 'train.json').stat().st_size / 2**20:.0f} MiB JSON) + {val_images} val in "
                  f"{time.perf_counter() - t:.0f} s under {root}", flush=True)
        env = dict(os.environ, FOCALDET_CACHE=str(root / "cache"), PYTHONPATH=str(REPO))
        common = ["--root", str(root), "--workers", str(args.workers)]
        cold = _run_phase(["--phase", "setup", *common], env)
        print(f"cold setup: {cold}", flush=True)
        warm = _run_phase(["--phase", "setup", *common], env)
        print(f"warm setup: {warm}", flush=True)
        loader = _run_phase(["--phase", "loader", *common, "--batches", str(args.batches)], env)
        print(f"loader: {loader}", flush=True)

    def worker(key: str) -> str:
        return " / ".join(f"{w['end']['pss'] / 1024:.2f} GB PSS, {w['end']['uss']:.0f} MiB private "
                          f"(start {w['start']['pss'] / 1024:.2f} GB, {w['start']['uss']:.0f} MiB)"
                          for w in loader["workers"][:2]) or "-"

    print()
    print(f"| measured ({args.images:,} train images, {val_images:,} val) | focaldet |")
    print("|---|---|")
    print(f"| `setup(\"fit\")`, first run (every image decoded by the scan) | {cold['seconds']:.1f} s, "
          f"peak RSS {cold['peak_rss_mib'] / 1024:.2f} GB |")
    print(f"| `setup(\"fit\")`, caches warm | {warm['seconds']:.1f} s ({warm['cpu_seconds']:.1f} s CPU), "
          f"peak RSS {warm['peak_rss_mib'] / 1024:.2f} GB |")
    print(f"| annotations held by the main process (USS after setup - before) | {warm['annotation_mib']:.0f} MiB "
          f"(process USS {warm['uss_mib'] / 1024:.2f} GB) |")
    print(f"| each worker: PSS / private memory after {loader['batches']:,} batches | {worker('end')} |")
    print(f"| loader throughput at 320 px, {args.workers} workers | {loader['images_per_s']:.0f} images/s |")


if __name__ == "__main__":
    main()
