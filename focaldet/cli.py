"""The ``focaldet`` command: a table of commands, each imported only when it runs.

``focaldet fit|validate|test|predict -c CONFIG.yaml [--key value ...]`` is Lightning's
``LightningCLI`` over ``RetinaNetModule`` and ``CocoDataModule``; ``focaldet data ...`` are
the dataset tools, ``focaldet bench`` the side-by-side benchmark, ``focaldet export`` the ONNX / torch.export files,
``focaldet equal-budget`` the side-by-side training run, ``focaldet sweep`` one run per cell of a
parameter grid, ``focaldet serve`` the model server and ``focaldet analyze`` the studies of a
trained model (``focaldet.analysis``).
"""

from __future__ import annotations

import sys

from focaldet.failures import report_errors

# every command of `focaldet`, with the one line `focaldet --help` shows
COMMANDS = {
    "fit": "train a model (-c CONFIG.yaml; see configs/)",
    "validate": "COCO mAP of a checkpoint on data.val_ann (--ckpt_path)",
    "test": "COCO mAP of a checkpoint on data.test_ann (--ckpt_path)",
    "predict": "detections of a checkpoint on a folder of images (--ckpt_path, --data.predict_images)",
    "data": "dataset tools: synth, check, split, convert, anchors, voc2coco, corrupt",
    "export": "a checkpoint as an ONNX or torch.export (.pt2) file; `export evaluate`: its COCO mAP",
    "serve": "a checkpoint behind an HTTP server: POST an image, get its detections",
    "bench": "speed and memory of focaldet against torchvision's RetinaNet, side by side",
    "sweep": "one training run per cell of a parameter grid (--param KEY=V1,V2)",
    "analyze": "studies of a trained model (loss-distribution)",
    "equal-budget": "focaldet and torchvision RetinaNet trained side by side on the same budget",
}


def usage() -> str:
    """What ``focaldet --help`` prints: every command with its line."""
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: focaldet COMMAND [options]   (focaldet COMMAND --help: the command's options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The ``focaldet`` command: :func:`run`, with focaldet errors printed as one line (exit 1)."""
    return report_errors(run, argv)


def run(argv: list[str] | None = None) -> int:
    """``focaldet ARGS`` raising focaldet errors (for callers that handle them)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    if args[0] not in COMMANDS and not args[0].startswith("-"):  # (Lightning parses e.g. `-c C fit`)
        from focaldet.errors import ConfigError

        raise ConfigError(f"unknown command {args[0]!r}; the commands: {', '.join(COMMANDS)} (focaldet --help)")
    if args and args[0] == "data":
        from focaldet.data.cli import main as data_main

        return data_main(args[1:])
    if args and args[0] == "bench":
        from focaldet.bench import main as bench_main

        return bench_main(args[1:])
    if args and args[0] == "serve":
        from focaldet.serve import main as serve_main

        return serve_main(args[1:])
    if args and args[0] == "export":
        from focaldet.export.cli import main as export_main

        return export_main(args[1:])
    if args and args[0] == "analyze":
        from focaldet.analysis.cli import main as analyze_main

        return analyze_main(args[1:])
    if args and args[0] == "equal-budget":
        from focaldet.tools.equal_budget import main as equal_budget_main

        return equal_budget_main(args[1:])
    if args and args[0] == "sweep":
        from focaldet.tools.sweep import main as sweep_main

        return sweep_main(args[1:])
    from focaldet.engine.lightning_cli import run_lightning

    return run_lightning(args)


def __getattr__(name: str):
    """``focaldet.cli.FocaldetCLI`` and the rest of the Lightning commands' names, from
    `focaldet.engine.lightning_cli` (imported on first use)."""
    if name.startswith("__"):  # the import system asks for __path__ and the like: not ours
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import focaldet.engine.lightning_cli as lightning_cli

    try:
        return getattr(lightning_cli, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


if __name__ == "__main__":
    sys.exit(main())
