"""Deployment formats made from the fp32 ONNX file: int8 ONNX and OpenVINO IR.

- ``quantize_int8(onnx_in, onnx_out, calibration_images)``: onnxruntime static quantisation
  (QDQ, int8 weights per channel, int8 activations, MinMax calibration) of the
  convolutions only: the in-graph resize, the anchors, box decoding, top-k and NMS stay fp32.
  The calibration inputs are what ``focaldet export evaluate`` feeds the model: each image read
  as ``read_image`` reads it, ``(1, 3, H, W)`` in [0, 1], resized by the graph itself.
  ``keep_fp32`` names convolutions to leave in fp32 (default: the head's two output
  convolutions, whose logits and deltas feed the thresholds and NMS directly).
- ``export_openvino(onnx_in, xml_out)``: the ONNX graph converted by OpenVINO (``.xml`` +
  ``.bin``), focaldet's metadata in the model's ``rt_info["focaldet"]``.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from focaldet.export.core import ExportError

__all__ = ["HEAD_OUTPUT_CONVS", "calibration_files", "export_openvino", "quantize_int8"]

# ONNX node-name fragments of the head's output convolutions (cls_logits, bbox_pred)
HEAD_OUTPUT_CONVS = ("cls_logits", "bbox_pred")
CALIBRATION_COUNT = 32


def calibration_files(folder: str | os.PathLike, count: int = CALIBRATION_COUNT, seed: int = 0) -> list[Path]:
    """Up to ``count`` image files of ``folder`` (recursively), a seeded random choice."""
    from focaldet.data.images import list_images
    from focaldet.errors import DataError

    try:
        files = list_images(folder, "--calibration_images folder")
    except DataError as e:
        raise ExportError(str(e)) from None
    random.Random(seed).shuffle(files)
    return sorted(files[:count])


def _no_preprocess_advice(record: logging.LogRecord) -> bool:
    # onnxruntime's advice to run its shape-inference pre-processing: it fails on the NMS graph
    return "pre-processing" not in record.getMessage() and "pre-processing" not in str(record.msg)


class _ImageReader:
    """onnxruntime's ``CalibrationDataReader``: one ``{"images": (1, 3, H, W) float32}`` per file."""

    def __init__(self, files: Sequence[Path]):
        self.files = list(files)
        self._it: Iterator[Path] = iter(self.files)

    def get_next(self):
        from focaldet.data import read_image

        path = next(self._it, None)
        if path is None:
            return None
        image = read_image(path)  # (H, W, 3) uint8 RGB
        return {"images": np.ascontiguousarray(image.transpose(2, 0, 1)[None], np.float32) / 255}

    def rewind(self) -> None:
        self._it = iter(self.files)


def conv_nodes(path: str | os.PathLike) -> dict[str, str]:
    """Conv node name -> its weight's name (``model.head.cls_logits.weight``) in an ONNX file."""
    import onnx

    return {n.name: n.input[1] for n in onnx.load(str(path), load_external_data=False).graph.node
            if n.op_type == "Conv"}


def quantize_int8(onnx_in: str | os.PathLike, onnx_out: str | os.PathLike, calibration_images: str | os.PathLike,
                  count: int = CALIBRATION_COUNT, keep_fp32: Sequence[str] | None = HEAD_OUTPUT_CONVS) -> Path:
    """Write the int8 (QDQ) version of the fp32 ONNX ``onnx_in`` to ``onnx_out``, calibrated on
    ``count`` images of ``calibration_images``; convolutions whose weight name contains one of
    ``keep_fp32`` stay fp32. The metadata is kept, plus ``quantization``."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    files = calibration_files(calibration_images, count)
    convs = conv_nodes(onnx_in)
    excluded = [n for n, w in convs.items() if any(k in w for k in (keep_fp32 or ()))]
    onnx_out = Path(onnx_out)
    logging.getLogger().addFilter(_no_preprocess_advice)
    try:
        quantize_static(str(onnx_in), str(onnx_out), _ImageReader(files), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["Conv"], per_channel=True, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
                        calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    finally:
        logging.getLogger().removeFilter(_no_preprocess_advice)
    model = onnx.load(str(onnx_out))
    meta = {p.key: p.value for p in onnx.load(str(onnx_in), load_external_data=False).metadata_props}
    meta["quantization"] = json.dumps({"format": "QDQ int8 (onnxruntime static, MinMax)",
                                       "calibration_images": len(files), "int8_convs": len(convs) - len(excluded),
                                       "fp32_convs": sorted({convs[n] for n in excluded})})
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    onnx.save(model, str(onnx_out))
    return onnx_out


def export_openvino(onnx_in: str | os.PathLike, xml_out: str | os.PathLike) -> Path:
    """Convert the fp32 ONNX ``onnx_in`` to OpenVINO IR ``xml_out`` (and its ``.bin``), fp32
    weights, the focaldet metadata in ``rt_info["focaldet"]``."""
    import onnx

    try:
        import openvino as ov
    except ImportError:
        raise ExportError("--format openvino needs the openvino package: pip install 'focaldet[export]'") from None
    xml_out = Path(xml_out)
    model = ov.convert_model(str(onnx_in))
    for p in onnx.load(str(onnx_in), load_external_data=False).metadata_props:
        model.set_rt_info(p.value, ["focaldet", p.key])
    ov.save_model(model, str(xml_out), compress_to_fp16=False)
    return xml_out


def openvino_metadata(model) -> dict[str, str]:
    """``rt_info["focaldet"]`` of an OpenVINO model as a dict (empty when absent)."""
    if not model.has_rt_info(["focaldet"]):
        return {}
    info = model.get_rt_info()["focaldet"]
    return {k: info[k].astype(str) for k in info}
