"""``focaldet analyze``: studies of a trained model.

    focaldet analyze loss-distribution -c CONFIG --ckpt_path X --gammas 0,0.5,1,2 --out fig4.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from focaldet.errors import ConfigError, WeightsError
from focaldet.config.recipe import read_config_file


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="focaldet analyze", description="studies of a trained model")
    sub = p.add_subparsers(dest="study", required=True)
    ld = sub.add_parser("loss-distribution", allow_abbrev=False, help="the paper's Figure 4: cumulative focal loss of "
                        "positives and negatives on the val split, one curve per gamma")
    ld.add_argument("-c", "--config", required=True, help="YAML config whose data section names the val split")
    ld.add_argument("--ckpt_path", required=True, help="focaldet checkpoint (.ckpt)")
    ld.add_argument("--gammas", default="0,0.5,1,2", help="comma-separated gammas (default 0,0.5,1,2)")
    ld.add_argument("--out", required=True, help="PNG to write; the numbers go to the same name with .csv")
    ld.add_argument("--max-images", type=int, default=None, help="only the first N val images")
    ld.add_argument("--max-negatives", type=int, default=1_000_000,
                    help="negatives kept (a uniform sample, seed --seed; default 1e6)")
    ld.add_argument("--seed", type=int, default=0)
    ld.add_argument("--trust_checkpoint_code", action="store_true", help="build classes outside focaldet's allow-list that the file names (a file you made: see docs/security.md)")
    ld.add_argument("--batch-size", type=int, default=None, help="default: the config's data.batch_size")
    return p


def _gammas(text: str) -> list[float]:
    try:
        gammas = [float(g) for g in text.split(",") if g.strip()]
    except ValueError:
        raise ConfigError(f"--gammas: expected comma-separated numbers, got {text!r}") from None
    if not gammas or any(g < 0 for g in gammas):
        raise ConfigError(f"--gammas: expected one or more numbers >= 0, got {text!r}")
    return gammas


def _data_args(config: str) -> dict:
    cfg = read_config_file(config)
    data = cfg.get("data") or {}
    data = dict(data.get("init_args") or {}) if "class_path" in data else dict(data)
    if not data.get("val_ann") or not data.get("val_images"):
        raise ConfigError(f"{config}: data.val_ann and data.val_images are needed (the val split is analysed)")
    return data


def loss_distribution(args: argparse.Namespace) -> int:
    import torch

    from focaldet.analysis.loss_distribution import collect_logits, plot, write_csv
    from focaldet.api import build_module, read_checkpoint
    from focaldet.data.datamodule import CocoDataModule

    gammas = _gammas(args.gammas)
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out}: expected a .png file name")
    data = _data_args(args.config)
    if not Path(args.ckpt_path).is_file():
        raise WeightsError(f"{args.ckpt_path}: no such checkpoint")
    contents = read_checkpoint(args.ckpt_path)
    module = build_module(contents, args.trust_checkpoint_code)
    if getattr(module.criterion.cls_loss, "background_logit", False):
        raise ConfigError(f"checkpoint {args.ckpt_path}: its class loss has a background logit (softmax); "
                          "the loss distribution is defined for sigmoid (binary) logits")
    # the val split of the config, prepared as the model was evaluated (its classes, its eval sizes)
    keep = ("val_ann", "val_images", "batch_size", "bad_images")
    dm = CocoDataModule(**{k: data[k] for k in keep if k in data}, num_workers=0,
                        label_map=contents.label_map, **contents.inputs.data_args())
    if args.batch_size:
        dm.batch_size = args.batch_size
    dm.setup("validate")
    if args.max_images is not None:
        dm.datasets["val"] = torch.utils.data.Subset(dm.datasets["val"], range(min(args.max_images, len(dm.datasets["val"]))))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, criterion = module.model.eval().to(device), module.criterion.to(device)
    dist = collect_logits(model, criterion, dm.val_dataloader(), args.max_negatives, args.seed, device)
    if dist.positives.size == 0:
        raise ConfigError(f"{data['val_ann']}: no positive anchors in the {dist.num_images} val images analysed")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = dist.rows(gammas)
    title = (f"{Path(args.ckpt_path).name} on {Path(data['val_ann']).name}: {dist.num_images} images, "
             f"{dist.negatives.size:,} of {dist.num_background_logits:,} background logits")
    plot(dist, gammas, out, title=title)
    csv_path = write_csv(rows, out.with_suffix(".csv"))
    print(f"{dist.num_images} images: {dist.positives.size} positives, {dist.negatives.size} of "
          f"{dist.num_background_logits} negatives (seed {args.seed})")
    for row in rows:
        print(f"{row['panel']:>9} gamma {row['gamma']:g}: hardest 20% carry {row['hardest_20pct_share']:.3f}, "
              f"hardest 5% {row['hardest_5pct_share']:.3f} of the loss")
    print(f"wrote {out} and {csv_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    return loss_distribution(args)
