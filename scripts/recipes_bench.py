"""The numbers of docs/recipes.md: backbones against R-18, EMA on/off and TTA on/off, on a
small synthetic set at one short, equal schedule (CPU-sized; the load of the machine is
printed with them, since it moves the speeds).

    python scripts/recipes_bench.py --out runs/recipes [--steps 60] [--only r18,mobilenet_v3_large]

Each run: ``focaldet fit -c <base> [-c configs/backbones/X.yaml] [-c configs/ema.yaml]`` on
128 px synthetic images (4 classes), then val mAP (logged during fit), training images/s (5
timed AdamW steps of batch 4 after 2 warm-up ones) and inference images/s (``predict`` on one
image at a time). TTA: the R-18 run's model, val mAP with flip / flip + 2 scales.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
RUNS = {"r18": [], **{p.stem: [f"configs/backbones/{p.name}"] for p in sorted((REPO / "configs/backbones").glob("*.yaml"))},
        "r18_ema": ["configs/ema.yaml"]}


def base_config(out: Path, data, steps: int) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": steps, "val_check_interval": steps,
                    "check_val_every_n_epoch": None, "log_every_n_steps": 10, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(out)},
        "model": {"model": {"backbone": {"class_path": "focaldet.models.ResNetBackbone",
                                         "init_args": {"depth": 18, "norm": "bn", "freeze_at": 0}},
                            "anchor_generator": {"class_path": "focaldet.models.AnchorGenerator",
                                                 "init_args": {"sizes": [16, 32, 64, 128, 256]}},
                            "fpn_channels": 64, "num_convs": 2},
                  "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.002, "weight_decay": 0.05}},
                  "lr_scheduler": {"init_args": {"warmup_iters": max(1, steps // 4)}},
                  "base_batch_size": 8, "decay_norm_and_bias": False},
        "data": {"train_ann": str(data.train_ann), "train_images": str(data.images), "val_ann": str(data.val_ann),
                 "val_images": str(data.images), "batch_size": 4, "num_workers": 0, "min_size": 128, "max_size": 128},
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / "base.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_speed(cli, steps: int = 5, warmup: int = 2) -> float:
    module, dm = cli.model, cli.datamodule
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module.train()
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        opt.zero_grad()
        module._losses(batch)["loss"].backward()
        opt.step()
    return steps * len(batch["images"]) / (time.perf_counter() - start)


def infer_speed(model, images, warmup: int = 2) -> float:
    model.eval()
    for im in images[:warmup]:
        model.predict([im])
    start = time.perf_counter()
    for im in images:
        model.predict([im])
    return len(images) / (time.perf_counter() - start)


def tta_maps(ckpt: Path, data) -> dict[str, float]:
    """val mAP of a checkpoint without and with TTA (flip; flip + scales 96, 128, 160), through
    the one predictor (``focaldet.load(ckpt).predict(paths, tta=...)``, as ``validate
    --model.tta.*`` runs it)."""
    from pycocotools.coco import COCO

    import focaldet
    from focaldet.evaluation import detections_to_coco, evaluate_coco

    det = focaldet.load(ckpt, device="cpu")
    gt = COCO(str(data.val_ann))
    ids = sorted(gt.getImgIds())
    paths = [data.images / gt.imgs[i]["file_name"] for i in ids]
    out = {}
    for name, tta in (("none", None), ("flip", {"flip": True}), ("flip+scales[96,128,160]",
                                                                 {"flip": True, "scales": [96, 128, 160]})):
        results = detections_to_coco(ids, det.predict(paths, tta=tta), det.category_ids)
        out[name] = float(evaluate_coco(gt, results).stats["mAP"]) if results else 0.0
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "recipes")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--only", help="comma-separated run names")
    parser.add_argument("--speed-only", action="store_true", help="no training: parameters and images/s only")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from focaldet.engine.lightning_cli import FocaldetCLI, trainer_defaults
    from focaldet.data import CocoDataModule
    from focaldet.data.synth import write_synthetic_coco
    from focaldet.engine.module import RetinaNetModule

    data = write_synthetic_coco(args.out / "data", num_images=args.images, seed=0, num_classes=4, image_size=128,
                                val_fraction=0.25)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    names = args.only.split(",") if args.only else list(RUNS)
    for name in names:
        run_dir = args.out / name
        base = base_config(run_dir, data, args.steps)
        cfgs = [x for c in [str(base), *[str(REPO / e) for e in RUNS[name]]] for x in ("-c", c)]
        load = os.getloadavg()[0]
        if args.speed_only:
            from focaldet.data import read_image

            built = FocaldetCLI(RetinaNetModule, CocoDataModule, args=cfgs, run=False, trainer_defaults={"logger": False})
            imgs = [torch.from_numpy(read_image(p)).permute(2, 0, 1).float() / 255
                    for p in sorted(data.images.iterdir())[:8]]
            row = {"params_M": round(sum(p.numel() for p in built.model.model.parameters()) / 1e6, 2),
                   "train_img_s": round(train_speed(built, steps=3, warmup=1), 1),
                   "infer_img_s": round(infer_speed(built.model.model, imgs), 1), "load_avg_1min": round(load, 1)}
            results.setdefault("speed", {})[name] = row
            print(name, row, flush=True)
            results_path.write_text(json.dumps(results, indent=1))
            continue
        start = time.perf_counter()
        fit = FocaldetCLI(RetinaNetModule, CocoDataModule, trainer_defaults=trainer_defaults(), args=["fit", *cfgs])
        fit_s = time.perf_counter() - start
        val_map = float(fit.trainer.callback_metrics["val/mAP"])
        built = FocaldetCLI(RetinaNetModule, CocoDataModule, args=cfgs, run=False,
                            trainer_defaults={"logger": False})
        params = sum(p.numel() for p in built.model.model.parameters()) / 1e6
        train_ips = train_speed(built)
        val_images = sorted(data.images.iterdir())[:12]
        from focaldet.data import read_image

        imgs = [torch.from_numpy(read_image(p)).permute(2, 0, 1).float() / 255 for p in val_images]
        infer_ips = infer_speed(fit.model.model, imgs)
        row = {"val_mAP": round(val_map, 4), "params_M": round(params, 2), "train_img_s": round(train_ips, 1),
               "infer_img_s": round(infer_ips, 1), "fit_s": round(fit_s, 1), "load_avg_1min": round(load, 1),
               "steps": args.steps}
        if name == "r18":
            from focaldet.engine.checkpoints import run_checkpoint_dirs

            ckpt = next(p for d in run_checkpoint_dirs(run_dir) for p in d.glob("best-*.ckpt"))
            try:
                row["tta_mAP"] = tta_maps(ckpt, data)
            except Exception as e:  # the training numbers still count
                row["tta_error"] = repr(e)
        results[name] = row
        print(name, row, flush=True)
        results_path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
