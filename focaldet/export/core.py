"""Export a `RetinaNet` to a file: ONNX (``.onnx``) or a ``torch.export`` program (``.pt2``).

Both files hold the `ExportableDetector` graph (see ``graph.py``) with N, H and W dynamic
and a metadata dict: class names, category ids, the eval input settings, the focaldet
version. The functions take the model, its category ids and names; they do not read
checkpoints (``focaldet.load`` does).
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from focaldet.errors import FocaldetError
from focaldet.export.graph import OUTPUT_NAMES, ExportableDetector
from focaldet.modeling.retinanet import RetinaNet

FORMATS = {"onnx": ".onnx", "torch_export": ".pt2", "openvino": ".xml"}
METADATA_FILE = "focaldet.json"  # its name inside a .pt2 archive (extra_files)
# the sample input traced; N, H and W stay dynamic (H, W from 32 px to 8192 px)
SAMPLE_SHAPE = (2, 3, 224, 320)
MIN_SIDE, MAX_SIDE = 32, 8192


class ExportError(FocaldetError, ValueError):
    """An export was asked for something it cannot do (format, output path, exported file)."""


def focaldet_version() -> str:
    try:
        return importlib.metadata.version("focaldet")
    except importlib.metadata.PackageNotFoundError:  # a checkout on PYTHONPATH, not installed
        return "unknown"


def metadata(model: RetinaNet, category_ids: Sequence[int], names: Sequence[str]) -> dict[str, str]:
    """String key/values stored with an exported model (ONNX ``metadata_props``)."""
    post = model.postprocess
    return {
        "focaldet_version": focaldet_version(),
        "names": json.dumps(list(names)),
        "category_ids": json.dumps([int(c) for c in category_ids]),
        "min_size": json.dumps(model.min_size),
        "max_size": json.dumps(model.max_size),
        "size_divisibility": json.dumps(model.size_divisibility),
        "pixel_mean": json.dumps([round(float(v), 6) for v in model.pixel_mean.flatten()]),
        "pixel_std": json.dumps([round(float(v), 6) for v in model.pixel_std.flatten()]),
        "score_thresh": json.dumps(post.score_thresh),
        "nms_thresh": json.dumps(post.nms_thresh),
        "detections_per_img": json.dumps(post.detections_per_img),
        "input": "images: float32 (N, 3, H, W) RGB in [0, 1]",
        "outputs": "boxes (N, D, 4) xyxy input pixels, scores (N, D), labels (N, D) category ids, "
                   "num_detections (N,); rows past num_detections: score 0",
    }


def exportable(model: RetinaNet, category_ids: Sequence[int], fuse_batchnorm: bool = True) -> ExportableDetector:
    """The graph to export, around a copy of ``model`` in eval mode (frozen BatchNorms folded
    into the convolutions unless ``fuse_batchnorm=False``; ``model`` is left as it is)."""
    model = copy.deepcopy(model).eval().requires_grad_(False)
    if fuse_batchnorm:
        model.fuse_batchnorm()
    return ExportableDetector(model, category_ids).eval()


def _dynamic_shapes() -> dict:
    dim = torch.export.Dim
    return {"images": {0: dim("N", min=1, max=1024), 2: dim("H", min=MIN_SIDE, max=MAX_SIDE),
                       3: dim("W", min=MIN_SIDE, max=MAX_SIDE)}}


def _sample(graph: ExportableDetector) -> torch.Tensor:
    return torch.rand(SAMPLE_SHAPE, generator=torch.Generator().manual_seed(0)).to(graph.category_ids.device)


def check_output(path: str | os.PathLike, fmt: str) -> Path:
    """``path`` as a Path, after checking the format and that a file can be written there
    (`focaldet.output_paths.check_output_file`: not a folder, its folder exists and is
    writable), before the minute of work."""
    from focaldet.output_paths import check_output_file

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    return check_output_file(path, "output", create_parent=False, error=ExportError)


def export_torch(model: RetinaNet, category_ids: Sequence[int], names: Sequence[str],
                 path: str | os.PathLike) -> Path:
    """Save a ``torch.export`` program of the detector to ``path`` (``.pt2``), metadata in
    the archive's ``focaldet.json``; load it with `load_torch_export`."""
    path = check_output(path, "torch_export")
    graph = exportable(model, category_ids)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's nms meta kernel: create_unbacked_symint is deprecated
        program = torch.export.export(graph, (_sample(graph),), dynamic_shapes=_dynamic_shapes())
    torch.export.save(program, path, extra_files={METADATA_FILE: json.dumps(metadata(model, category_ids, names))})
    return path


def load_torch_export(path: str | os.PathLike, trust_code: bool = False) -> tuple[torch.nn.Module, dict[str, str]]:
    """``(module, metadata)`` of a ``.pt2`` written by `export_torch`; ``module(images)``
    returns ``(boxes, scores, labels, num_detections)``. An archive holding pickles that
    would run code, or compiled code, is refused unless ``trust_code`` (`focaldet.config.safe_load.check_pt2`)."""
    from focaldet.errors import WeightsError
    from focaldet.config.safe_load import UnsafeFileError, check_pt2

    try:
        check_pt2(path, trust_code)
    except UnsafeFileError:
        raise
    except WeightsError as e:  # no such file, not a zip archive
        reason = str(e).split(": ", 1)[-1]
        raise ExportError(f"{path}: {'no such file' if 'no such file' in reason else f'not a torch.export program ({reason})'}") from None
    extra = {METADATA_FILE: ""}
    try:
        program = torch.export.load(path, extra_files=extra)
    except FileNotFoundError:
        raise ExportError(f"{path}: no such file") from None
    except Exception as e:  # a truncated or foreign archive
        raise ExportError(f"{path}: not a torch.export program ({type(e).__name__}: {e})") from None
    return program.module(), json.loads(extra[METADATA_FILE] or "{}")


def export_onnx(model: RetinaNet, category_ids: Sequence[int], names: Sequence[str], path: str | os.PathLike,
                opset: int | None = None) -> Path:
    """Save the detector as ONNX to ``path`` (the dynamo exporter: ``torch.onnx.export(...,
    dynamo=True)``), metadata in ``metadata_props``. Input ``images``; outputs ``boxes``,
    ``scores``, ``labels``, ``num_detections`` (see ``graph.py``)."""
    import onnx

    path = check_output(path, "onnx")
    graph = exportable(model, category_ids)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(graph, (_sample(graph),), dynamo=True, dynamic_shapes=_dynamic_shapes(),
                                    input_names=["images"], output_names=list(OUTPUT_NAMES), opset_version=opset,
                                    verbose=False)
    proto = program.model_proto
    for key, value in metadata(model, category_ids, names).items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    onnx.save(proto, str(path))
    return path


def export(model: RetinaNet, category_ids: Sequence[int], names: Sequence[str], path: str | os.PathLike,
           fmt: str = "onnx", quantize: str | None = None, calibration_images: str | os.PathLike | None = None,
           calibration_count: int | None = None) -> Path:
    """`export_onnx`, `export_torch` or OpenVINO IR (from the ONNX graph) by ``fmt`` (``"onnx"`` |
    ``"torch_export"`` | ``"openvino"``); ``quantize="int8"`` (ONNX only) quantises the ONNX file,
    calibrated on ``calibration_images`` (see ``focaldet.export.formats``)."""
    import tempfile

    check_output(path, fmt)
    if quantize is not None and (quantize != "int8" or fmt != "onnx"):
        raise ExportError(f"--quantize {quantize}: only --quantize int8 of --format onnx is supported")
    if quantize is not None and calibration_images is None:
        raise ExportError("--quantize int8 needs --calibration_images DIR (images like the ones it will see)")
    if fmt == "torch_export":
        return export_torch(model, category_ids, names, path)
    if fmt == "onnx" and quantize is None:
        return export_onnx(model, category_ids, names, path)
    from focaldet.export import formats

    if calibration_images is not None:
        formats.calibration_files(calibration_images, 1)  # a bad folder fails before the slow export
    with tempfile.TemporaryDirectory(prefix="focaldet-export-") as tmp:
        fp32 = export_onnx(model, category_ids, names, Path(tmp) / "fp32.onnx")
        if fmt == "openvino":
            return formats.export_openvino(fp32, path)
        return formats.quantize_int8(fp32, path, calibration_images,
                                     calibration_count or formats.CALIBRATION_COUNT)
