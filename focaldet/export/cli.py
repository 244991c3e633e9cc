"""``focaldet export``: a checkpoint to an ONNX or ``torch.export`` file, and the COCO mAP
of an exported file.

    focaldet export --ckpt_path X --format onnx --output model.onnx
    focaldet export --ckpt_path X --format torch_export --output model.pt2
    focaldet export --ckpt_path X --format onnx --quantize int8 --calibration_images DIR --output model.int8.onnx
    focaldet export --ckpt_path X --format openvino --output model.xml
    focaldet export evaluate model.onnx --val_ann instances_val.json --val_images images/
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from focaldet.errors import FocaldetError
from focaldet.failures import report_errors
from focaldet.export.core import FORMATS, ExportError, check_output, export


def load_checkpoint(path: str, trust_code: bool = False):
    """``focaldet.load(path)`` with the checkpoint named in any failure."""
    import focaldet

    if not Path(path).is_file():
        raise ExportError(f"{path}: no such checkpoint")
    load = getattr(focaldet, "load", None)
    if load is None:
        raise ExportError("focaldet.load is not available in this build: cannot read checkpoints yet")
    try:
        return load(path, device="cpu", trust_code=trust_code)
    except FocaldetError:
        raise
    except Exception as e:  # truncated, not a checkpoint, ...
        raise ExportError(f"{path}: not a readable focaldet checkpoint ({type(e).__name__}: {e})") from None


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="focaldet export", description=__doc__.split("\n\n")[0],
                                epilog="focaldet export evaluate MODEL --val_ann A --val_images DIR: "
                                       "the COCO mAP of an exported file (see focaldet export evaluate -h)")
    p.add_argument("--ckpt_path", required=True, help="focaldet checkpoint (.ckpt)")
    p.add_argument("--format", default="onnx", help=f"{' | '.join(FORMATS)} (default onnx)")
    p.add_argument("--output", required=True, help="file to write (.onnx / .pt2 / .xml)")
    p.add_argument("--quantize", default=None, choices=("int8",),
                   help="onnx only: onnxruntime static int8 quantisation of the convolutions")
    p.add_argument("--calibration_images", default=None, metavar="DIR",
                   help="--quantize: images to calibrate the int8 ranges on (e.g. the train images)")
    p.add_argument("--calibration_count", type=int, default=None, metavar="N",
                   help="--quantize: how many of them (default 32, a seeded random choice)")
    p.add_argument("--trust_checkpoint_code", action="store_true", help="build classes outside focaldet's allow-list that the file names (a file you made: see docs/security.md)")
    return p


def _evaluate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="focaldet export evaluate",
                                description="COCO mAP of an exported model (onnxruntime for .onnx) on a COCO set")
    p.add_argument("model", help="exported file (.onnx, .pt2 or OpenVINO .xml)")
    p.add_argument("--val_ann", required=True, help="COCO instances JSON")
    p.add_argument("--val_images", required=True, help="folder the JSON's file_name entries are relative to")
    from focaldet.evaluation.coco import BACKENDS, DEFAULT_BACKEND

    p.add_argument("--backend", default=DEFAULT_BACKEND, choices=BACKENDS)
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its choice)")
    p.add_argument("--trust_checkpoint_code", action="store_true",
                   help="read a .pt2 holding pickled payloads (a file you made: see docs/security.md)")
    return p


def _run(argv: list[str]) -> int:
    if argv and argv[0] == "evaluate":
        from focaldet.export.evaluate import evaluate_exported

        args = _evaluate_parser().parse_args(argv[1:])
        result = evaluate_exported(args.model, args.val_ann, args.val_images, args.backend, args.threads,
                                   progress=True, trust_code=args.trust_checkpoint_code)
        print(result.table())
        return 0
    args = _export_parser().parse_args(argv)
    check_output(args.output, args.format)  # before the (slow) checkpoint read
    if args.quantize and not args.calibration_images:
        raise ExportError("--quantize int8 needs --calibration_images DIR (images like the ones it will see)")
    det = load_checkpoint(args.ckpt_path, args.trust_checkpoint_code)
    start = time.perf_counter()
    path = export(det.model, det.category_ids, det.names, args.output, args.format, args.quantize,
                  args.calibration_images, args.calibration_count)
    kind = f"{args.format}{' ' + args.quantize if args.quantize else ''}"
    print(f"wrote {path} ({kind}, {path.stat().st_size / 2**20:.1f} MiB, {time.perf_counter() - start:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return report_errors(_run, list(sys.argv[1:] if argv is None else argv), prog="focaldet export")
