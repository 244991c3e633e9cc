"""The ``focaldet`` command: a table of commands, each imported only when it runs.

``focaldet fit|validate|test|predict -c CONFIG.yaml [--key value ...]`` is Lightning's
``LightningCLI`` over ``RetinaNetModule`` and ``CocoDataModule``; ``focaldet data ...`` are
the dataset tools, ``focaldet bench`` the side-by-side benchmark, ``focaldet export`` the ONNX / torch.export files,
``focaldet equal-budget`` the side-by-side training run, ``focaldet sweep`` one run per cell of a
parameter grid, ``focaldet serve`` the model server and ``focaldet analyze`` the studies of a
trained model (``focaldet.analysis``).
"""

from __future__ import annotations

import importlib
import os
import sys

from focaldet.failures import report_errors

# every command of `focaldet`: the function that runs it ("module:function", imported only when
# the command runs) and the one line `focaldet --help` shows
COMMANDS = {
    "fit": ("focaldet.engine.lightning_cli:run_lightning", "train a model (-c CONFIG.yaml; see configs/)"),
    "validate": ("focaldet.engine.lightning_cli:run_lightning", "COCO mAP of a checkpoint on data.val_ann (--ckpt_path)"),
    "test": ("focaldet.engine.lightning_cli:run_lightning", "COCO mAP of a checkpoint on data.test_ann (--ckpt_path)"),
    "predict": ("focaldet.engine.lightning_cli:run_lightning",
                "detections of a checkpoint on a folder of images (--ckpt_path, --data.predict_images)"),
    "data": ("focaldet.data.cli:main", "dataset tools: synth, check, split, convert, anchors, voc2coco, corrupt"),
    "export": ("focaldet.export.cli:main",
               "a checkpoint as an ONNX or torch.export (.pt2) file; `export evaluate`: its COCO mAP"),
    "serve": ("focaldet.serve:main", "a checkpoint behind an HTTP server: POST an image, get its detections"),
    "bench": ("focaldet.bench:main", "speed and memory of focaldet against torchvision's RetinaNet, side by side"),
    "sweep": ("focaldet.tools.sweep:main", "one training run per cell of a parameter grid (--param KEY=V1,V2)"),
    "analyze": ("focaldet.analysis.cli:main", "studies of a trained model (loss-distribution)"),
    "equal-budget": ("focaldet.tools.equal_budget:main",
                     "focaldet and torchvision RetinaNet trained side by side on the same budget"),
}
# LightningCLI's subcommands: their function parses the whole command line, the command included
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def usage() -> str:
    """What ``focaldet --help`` prints: every command with its line."""
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: focaldet COMMAND [options]   (focaldet COMMAND --help: the command's options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The ``focaldet`` command: :func:`run`, with focaldet errors printed as one line (exit 1)."""
    try:
        try:
            return report_errors(run, argv)
        finally:  # (also when argparse exits after --help)
            sys.stdout.flush()
    except BrokenPipeError:  # `focaldet fit --help | head`: the reader left; no traceback (Python's recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def run(argv: list[str] | None = None) -> int:
    """``focaldet ARGS`` raising focaldet errors (for callers that handle them)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    name = args[0]
    if name.startswith("-"):  # Lightning parses e.g. `-c C fit`
        name = LIGHTNING_COMMANDS[0]
    elif name not in COMMANDS:
        from focaldet.errors import ConfigError

        raise ConfigError(f"unknown command {name!r}; the commands: {', '.join(COMMANDS)} (focaldet --help)")
    module, function = COMMANDS[name][0].split(":")
    command = getattr(importlib.import_module(module), function)
    return command(args if name in LIGHTNING_COMMANDS else args[1:])


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
