"""``focaldet data ...`` subcommands: ``synth``, ``check`` and ``voc2coco``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from focaldet.errors import FocaldetError
from focaldet.inputs import InputSettings

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="focaldet data", description="Dataset tools.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synth = sub.add_parser("synth", help="write the synthetic shapes dataset (COCO format)")
    synth.add_argument("--out", required=True, type=Path, help="output folder")
    synth.add_argument("--num-images", type=int, default=700, help="train + val images (default 700)")
    synth.add_argument("--val-fraction", type=float, default=0.15, help="share of images in val (default 0.15)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--classes", type=int, default=4, help="number of shape classes, 1-8 (default 4)")
    synth.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")

    check = sub.add_parser("check", help="validate a COCO dataset and report statistics and problems")
    check.add_argument("annotations", type=Path, help="COCO instances JSON")
    check.add_argument("--images", type=Path, help="image folder (files are not checked without it)")
    check.add_argument("--min-size", type=int, default=InputSettings.min_size,
                       help=f"shorter side after resizing (default {InputSettings.min_size})")
    check.add_argument("--max-size", type=int, default=InputSettings.max_size,
                       help=f"longer-side cap after resizing (default {InputSettings.max_size})")
    check.add_argument("--json", type=Path, metavar="OUT", help="also write the report as JSON")

    voc = sub.add_parser("voc2coco", help="convert Pascal VOC XML annotations to a COCO JSON")
    voc.add_argument("--ann-dir", required=True, type=Path, help="folder of VOC *.xml files")
    voc.add_argument("--out", required=True, type=Path, help="output COCO JSON")
    voc.add_argument("--labels", help="comma-separated class names, fixing the order (ids 1..K)")
    voc.add_argument("--skip-difficult", action="store_true", help="leave out objects marked difficult")
    return parser


def _synth(args: argparse.Namespace) -> int:
    from focaldet.data.synth import write_synthetic_coco

    paths = write_synthetic_coco(args.out, args.num_images, args.seed, args.classes, args.size, args.val_fraction)
    print(f"wrote {paths.train_ann}, {paths.val_ann} and images in {paths.images}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from focaldet.data.doctor import check_dataset

    report = check_dataset(args.annotations, args.images, min_size=args.min_size, max_size=args.max_size)
    print(report.format())
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.to_dict(), indent=2))
    return 0 if report.ok else 1


def _voc2coco(args: argparse.Namespace) -> int:
    from focaldet.data.voc import convert_voc_to_coco

    labels = [name.strip() for name in args.labels.split(",") if name.strip()] if args.labels else None
    data = convert_voc_to_coco(args.ann_dir, args.out, labels, include_difficult=not args.skip_difficult)
    print(
        f"wrote {args.out}: {len(data['images'])} images, {len(data['annotations'])} boxes, "
        f"{len(data['categories'])} categories ({', '.join(c['name'] for c in data['categories'])})"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``focaldet data <command> ...``; returns the exit code (1 on bad data)."""
    args = build_parser().parse_args(argv)
    handler = {"synth": _synth, "check": _check, "voc2coco": _voc2coco}[args.command]
    try:
        return handler(args)
    except FocaldetError as e:
        print(f"focaldet data {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
