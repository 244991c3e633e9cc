"""``focaldet data ...`` subcommands: ``synth``, ``check``, ``split``, ``anchors``, ``convert``, ``voc2coco``
(``convert --from voc`` for one folder of XML files) and ``corrupt``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from focaldet.failures import report_errors
from focaldet.data.sampling import REPEAT_RULES
from focaldet.config.inputs import InputSettings

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="focaldet data", description="Dataset tools.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synth = sub.add_parser("synth", allow_abbrev=False, help="write the synthetic shapes dataset (COCO format)")
    synth.add_argument("--out", required=True, type=Path, help="output folder")
    synth.add_argument("--num-images", type=int, default=700, help="train + val images (default 700)")
    synth.add_argument("--val-fraction", type=float, default=0.15, help="share of images in val (default 0.15)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--classes", type=int, default=4, help="number of shape classes, 1-8 (default 4)")
    synth.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    synth.add_argument("--crowded", action="store_true", help="300-1000 small objects per 512 px image (scaled with the area)")

    check = sub.add_parser("check", allow_abbrev=False, help="validate a COCO dataset and report statistics and problems")
    check.add_argument("annotations", type=Path, help="COCO instances JSON")
    check.add_argument("--images", type=Path, help="image folder (files are not checked without it)")
    check.add_argument("-c", "--config", type=Path, metavar="CONFIG",
                       help="report the anchor coverage with this training config's anchors "
                            "(model.model.anchor_generator) at its eval size (data.min_size, max_size or eval_transforms)")
    check.add_argument("--min-size", type=int, help=f"shorter side after resizing (default: the config's, "
                                                    f"else {InputSettings.min_size})")
    check.add_argument("--max-size", type=int, help=f"longer-side cap after resizing (default: the config's, "
                                                    f"else {InputSettings.max_size})")
    check.add_argument("--json", type=Path, metavar="OUT", help="also write the report as JSON")
    check.add_argument("--workers", type=int, help="threads decoding images (default: the CPUs, at most 16)")
    check.add_argument("--repeat-threshold", type=float, metavar="T",
                       help="also print the per-class frequency per epoch with repeat-factor sampling at "
                            "threshold T (data.repeat_threshold; LVIS uses 0.001)")
    check.add_argument("--repeat-rule", choices=REPEAT_RULES, default="sqrt",
                       help="repeat-factor rule (data.repeat_rule, default sqrt)")
    check.add_argument("--no-cache", dest="cache", action="store_false",
                       help="decode every image again instead of reusing the cached scan")

    anchors = sub.add_parser("anchors", allow_abbrev=False, help="best possible recall of the anchors on a dataset, and anchors "
                                             "fitted to it (YAML to paste under model.model.anchor_generator)")
    anchors.add_argument("annotations", type=Path, help="COCO instances JSON (the training split)")
    anchors.add_argument("--images", type=Path, help="image folder: checks that every image file exists (not "
                                                     "needed: the sizes come from the JSON; nothing is decoded)")
    anchors.add_argument("-c", "--config", type=Path, metavar="CONFIG",
                         help="take the current anchors (model.model.anchor_generator) and the input sizes (data.min_size, "
                              "max_size, size_divisibility) from this config (default: the model's COCO anchors)")
    anchors.add_argument("--min-size", type=int, help=f"shorter side after resizing (default: the config's, "
                                                      f"else {InputSettings.min_size})")
    anchors.add_argument("--max-size", type=int, help=f"longer-side cap after resizing (default: the config's, "
                                                      f"else {InputSettings.max_size})")
    anchors.add_argument("--sample", type=int, default=5000, metavar="N",
                         help="fit on a random sample of N boxes (default 5000); the BPR is then reported on all")
    anchors.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    anchors.add_argument("--json", type=Path, metavar="OUT", help="also write the numbers as JSON")

    split = sub.add_parser("split", allow_abbrev=False, help="split one COCO JSON into train/val(/test) JSONs, stratified by class "
                                         "(an image and its boxes go to one split)")
    split.add_argument("annotations", type=Path, help="COCO instances JSON (all your images)")
    split.add_argument("--val", type=float, required=True, help="share of the images in val, e.g. 0.2")
    split.add_argument("--test", type=float, default=0.0, help="share of the images in test (default 0: no test split)")
    split.add_argument("--seed", type=int, default=0, help="seed of the random order (default 0)")
    split.add_argument("--out", type=Path, required=True, help="folder for train.json, val.json (and test.json)")

    convert = sub.add_parser("convert", allow_abbrev=False, help="convert a YOLO or VOC dataset to COCO JSON (or a COCO split to YOLO)")
    convert.add_argument("data", type=Path, help="YOLO: its data.yaml; VOC: the folder with Annotations/ "
                                                 "(and ImageSets/Main/<split>.txt); COCO: an instances JSON")
    convert.add_argument("--from", dest="source", required=True, choices=("yolo", "voc", "coco"))
    convert.add_argument("--to", dest="target", default="coco", choices=("coco", "yolo"), help="default coco")
    convert.add_argument("--out", required=True, type=Path,
                         help="output folder: OUT/annotations/instances_<split>.json (YOLO: OUT/data.yaml, labels/)")
    convert.add_argument("--images", type=Path, help="--from coco: the image folder of the JSON's file_names")
    convert.add_argument("--split", default="train", help="--from coco --to yolo: the split's name (default train)")
    convert.add_argument("--labels", help="VOC: comma-separated class names, fixing the order (ids 1..K)")
    convert.add_argument("--skip-difficult", action="store_true", help="VOC: leave out objects marked difficult")

    voc = sub.add_parser("voc2coco", allow_abbrev=False, help="convert Pascal VOC XML annotations to a COCO JSON")
    voc.add_argument("--ann-dir", required=True, type=Path, help="folder of VOC *.xml files")
    voc.add_argument("--out", required=True, type=Path, help="output COCO JSON")
    voc.add_argument("--labels", help="comma-separated class names, fixing the order (ids 1..K)")
    voc.add_argument("--skip-difficult", action="store_true", help="leave out objects marked difficult")

    corrupt = sub.add_parser("corrupt", allow_abbrev=False, help="write a noisy copy of a COCO dataset (flipped labels, "
                                             "dropped or jittered boxes) for robustness studies")
    corrupt.add_argument("annotations", type=Path, help="COCO instances JSON")
    corrupt.add_argument("--out", required=True, type=Path, help="noisy COCO JSON to write (+ OUT.summary.json)")
    corrupt.add_argument("--flip-labels", type=float, default=0.0, metavar="P",
                         help="relabel this fraction of the boxes, each to a random other class")
    corrupt.add_argument("--drop-boxes", type=float, default=0.0, metavar="P", help="remove this fraction of the boxes")
    corrupt.add_argument("--jitter-boxes", type=float, default=0.0, metavar="S",
                         help="move each box edge by normal noise of S x the box's width/height")
    corrupt.add_argument("--seed", type=int, required=True)
    return parser


def _corrupt(args: argparse.Namespace) -> int:
    from focaldet.data.corrupt import corrupt_file

    summary, summary_path = corrupt_file(args.annotations, args.out, args.flip_labels, args.drop_boxes,
                                         args.jitter_boxes, args.seed)
    print(summary.format())
    print(f"wrote {args.out} and {summary_path}")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from focaldet.data.synth import write_synthetic_coco

    paths = write_synthetic_coco(args.out, args.num_images, args.seed, args.classes, args.size, args.val_fraction,
                                 args.crowded)
    print(f"wrote {paths.train_ann}, {paths.val_ann} and images in {paths.images}")
    return 0


def _sizes_and_anchors(args: argparse.Namespace):
    """The eval ``InputSettings`` and the anchor generator (None: the model's default) of
    ``-c CONFIG`` (none: the defaults), with ``--min-size`` / ``--max-size`` overriding them."""
    from focaldet.analysis.anchors import read_anchor_config
    from focaldet.errors import ConfigError

    generator, data_args = read_anchor_config(args.config) if args.config is not None else (None, {})
    if args.min_size is not None:
        data_args.update(min_size=args.min_size, eval_transforms=None)
    if args.max_size is not None:
        data_args.update(max_size=args.max_size, eval_transforms=None)
    data_args = {k: v for k, v in data_args.items() if v is not None}  # null: the default
    settings = InputSettings.from_data(**data_args)
    if settings.min_size is None:
        raise ConfigError(f"{args.config}: data.eval_transforms does not start with a ResizeShortestEdge, so the "
                          f"eval size is unknown; give --min-size and --max-size")
    return settings, generator


def _check(args: argparse.Namespace) -> int:
    from focaldet.data.doctor import check_dataset

    settings, generator = _sizes_and_anchors(args)
    report = check_dataset(args.annotations, args.images, min_size=settings.min_size, max_size=settings.max_size,
                           size_divisibility=settings.size_divisibility, anchor_generator=generator,
                           workers=args.workers, progress=None, cache=args.cache,
                           repeat_threshold=args.repeat_threshold, repeat_rule=args.repeat_rule)
    print(report.format())
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.to_dict(), indent=2))
    return 0 if report.ok else 1


def _anchors(args: argparse.Namespace) -> int:
    from focaldet.analysis.anchors import analyse_anchors, check_image_files, read_anchor_config, read_boxes
    from focaldet.errors import ConfigError

    for flag, value in (("--min-size", args.min_size), ("--max-size", args.max_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1 pixel, got {value}")
    current, data_args = read_anchor_config(args.config) if args.config is not None else (None, {})
    if args.min_size is not None:
        data_args.update(min_size=args.min_size, eval_transforms=None)
    if args.max_size is not None:
        data_args.update(max_size=args.max_size, eval_transforms=None)
    settings = InputSettings.from_data(**{k: v for k, v in data_args.items() if v is not None})  # null: default
    if args.sample < 1:
        raise ConfigError(f"--sample must be >= 1, got {args.sample}")
    data = read_boxes(args.annotations)
    if args.images is not None:
        check_image_files(args.images, data.file_names)
    analysis = analyse_anchors(args.annotations, settings, current, args.sample, args.seed, data=data)
    analysis.default_sizes = not ({"min_size", "max_size", "eval_transforms"} & set(data_args))
    print(analysis.format())
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(analysis.to_dict(), indent=2))
    return 0


def _split(args: argparse.Namespace) -> int:
    from focaldet.data.split import format_split, split_file

    paths = split_file(args.annotations, args.out, args.val, args.test, args.seed)
    parts = {split: json.loads(path.read_text()) for split, path in paths.items()}
    print(format_split(parts))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def _voc2coco(args: argparse.Namespace) -> int:
    from focaldet.data.voc import convert_voc_to_coco

    labels = [name.strip() for name in args.labels.split(",") if name.strip()] if args.labels else None
    data = convert_voc_to_coco(args.ann_dir, args.out, labels, include_difficult=not args.skip_difficult)
    print(
        f"wrote {args.out}: {len(data['images'])} images, {len(data['annotations'])} boxes, "
        f"{len(data['categories'])} categories ({', '.join(c['name'] for c in data['categories'])})"
    )
    return 0


def _convert(args: argparse.Namespace) -> int:
    from focaldet.data import convert
    from focaldet.errors import ConfigError

    if (args.source == "coco") == (args.target == "coco"):
        raise ConfigError(f"--from {args.source} --to {args.target}: one side must be COCO, the other not")
    if args.target == "yolo":
        if args.images is None:
            raise ConfigError("--from coco --to yolo needs --images (the folder of the JSON's file_names)")
        yaml_path = convert.coco_to_yolo(args.data, args.images, args.out, args.split)
        print(f"wrote {yaml_path} and {args.out / 'labels' / args.split} (images linked, not copied)")
        return 0
    if args.source == "yolo":
        from focaldet.config.recipe import read_config_file

        config = read_config_file(args.data)
        splits = {s: convert.yolo_to_coco(args.data, s) for s in convert.SPLITS if config.get(s)}
        if not splits:
            raise ConfigError(f"{args.data}: none of the splits {list(convert.SPLITS)} is set")
        root = Path(str(config.get("path") or args.data.parent)).expanduser()
        root = root if root.is_absolute() else args.data.parent / root
    else:
        labels = [name.strip() for name in args.labels.split(",") if name.strip()] if args.labels else None
        splits = convert.voc_dataset_to_coco(args.data, labels, include_difficult=not args.skip_difficult)
        root = None
    for split, data in splits.items():
        path = convert.write_coco(data, args.out / "annotations" / f"instances_{split}.json")
        with_boxes = len({a["image_id"] for a in data["annotations"]})
        print(f"wrote {path}: {len(data['images'])} images ({len(data['images']) - with_boxes} background), "
              f"{len(data['annotations'])} boxes, {len(data['categories'])} categories "
              f"({', '.join(c['name'] for c in data['categories'])})")
    if root is not None:
        print(f"images: --data.train_images {root} (file_name is relative to it)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``focaldet data <command> ...``; returns the exit code (1 on bad data)."""
    args = build_parser().parse_args(argv)
    handler = {"synth": _synth, "check": _check, "split": _split, "anchors": _anchors, "voc2coco": _voc2coco,
               "convert": _convert,
               "corrupt": _corrupt}[args.command]
    return report_errors(handler, args, prog=f"focaldet data {args.command}")


if __name__ == "__main__":
    sys.exit(main())
