"""Run an exported detector: ONNX through onnxruntime, ``.pt2`` through ``torch.export``.

``ExportedDetector(path)`` reads either file and its metadata; ``detector(images)`` takes
a float32 ``(N, 3, H, W)`` batch in [0, 1] and returns per image ``{"boxes" (M, 4),
"scores" (M,), "category_ids" (M,)}`` (the first ``num_detections`` rows), as tensors;
``detector.predict_file(path)`` reads an image file as focaldet's own commands read it (so its
detections are ``focaldet predict``'s).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from focaldet.export.core import ExportError, load_torch_export
from focaldet.export.graph import OUTPUT_NAMES


def onnx_session(path: str | os.PathLike, threads: int = 0, spinning: bool = True):
    """An onnxruntime CPU session of ``path``, graph optimisations on; ``threads`` 0 =
    onnxruntime's choice. ``spinning=False`` stops its threads busy-waiting after each run
    (they would take the cores from whatever runs next, e.g. the other side of a benchmark)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # NO_SUCHFILE, INVALID_PROTOBUF, ...
        reason = "no such file" if not Path(path).is_file() else f"not a loadable ONNX model ({str(e).splitlines()[0]})"
        raise ExportError(f"{path}: {reason}") from None


def openvino_model(path: Path, threads: int = 0):
    """``(compiled model, metadata)`` of an OpenVINO IR file on the CPU; ``threads`` 0 = its choice."""
    import openvino as ov

    from focaldet.export.formats import openvino_metadata

    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    core = ov.Core()
    try:
        model = core.read_model(str(path))
        # fp32 as exported: the CPU plugin would otherwise run bf16 on CPUs that have it (AMX, AVX512-BF16)
        config = {"INFERENCE_PRECISION_HINT": "f32", **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
        compiled = core.compile_model(model, "CPU", config)
    except Exception as e:  # not IR, missing .bin, ...
        raise ExportError(f"{path}: not a loadable OpenVINO model ({str(e).splitlines()[0]})") from None
    return compiled, openvino_metadata(model)


class ExportedDetector:
    """An exported focaldet model (``.onnx`` or ``.pt2``) with its metadata (``names``,
    ``category_ids``, ``min_size``, ...) and a call on image batches."""

    def __init__(self, path: str | os.PathLike, threads: int = 0, spinning: bool = True, trust_code: bool = False):
        self.path = Path(path)
        self._openvino = None
        if self.path.suffix == ".pt2":
            self._module, meta = load_torch_export(self.path, trust_code)
            self._session = None
        elif self.path.suffix == ".xml":
            self._openvino, meta = openvino_model(self.path, threads)
            self._session = None
        else:
            self._session = onnx_session(self.path, threads, spinning)
            meta = dict(self._session.get_modelmeta().custom_metadata_map)
        if "category_ids" not in meta:
            raise ExportError(f"{self.path}: no focaldet metadata (category_ids): not exported by focaldet export")
        self.metadata = meta
        self.names: list[str] = json.loads(meta["names"])
        self.category_ids: list[int] = json.loads(meta["category_ids"])

    def run(self, images: Tensor | np.ndarray) -> tuple[np.ndarray, ...]:
        """The raw outputs ``(boxes (N, D, 4), scores (N, D), labels (N, D), num_detections (N,))``."""
        if self._session is not None:
            x = images.detach().cpu().numpy() if isinstance(images, Tensor) else images
            return tuple(self._session.run(list(OUTPUT_NAMES), {"images": np.ascontiguousarray(x, np.float32)}))
        if self._openvino is not None:
            x = images.detach().cpu().numpy() if isinstance(images, Tensor) else images
            out = self._openvino({"images": np.ascontiguousarray(x, np.float32)})
            return tuple(out[self._openvino.output(name)] for name in OUTPUT_NAMES)
        with torch.no_grad():
            return tuple(t.numpy() for t in self._module(torch.as_tensor(images, dtype=torch.float32)))

    def __call__(self, images: Tensor | np.ndarray) -> list[dict[str, Tensor]]:
        boxes, scores, labels, counts = self.run(images)
        return [{"boxes": torch.from_numpy(b[:k]), "scores": torch.from_numpy(s[:k]),
                 "category_ids": torch.from_numpy(c[:k])}
                for b, s, c, k in zip(boxes, scores, labels, counts.tolist())]

    @property
    def eval_size(self) -> tuple[int | None, int]:
        """``(min_size, max_size)`` of the graph's resize (``min_size`` ``None``: none)."""
        return json.loads(self.metadata.get("min_size", "null")), json.loads(self.metadata.get("max_size", "null"))

    def predict_image(self, image: np.ndarray) -> dict[str, Tensor]:
        """Detections of one ``(H, W, 3)`` uint8 RGB image (what ``read_image`` returns)."""
        return self(image.transpose(2, 0, 1)[None].astype(np.float32) / 255)[0]

    def predict_file(self, path: str | os.PathLike) -> dict[str, Tensor]:
        """Detections of an image file, in its pixels, read as ``focaldet predict`` reads it
        (`focaldet.data.coco.decode_for_pipeline`): a large JPEG decoded at 1/2, 1/4 or 1/8 when
        the graph's resize shrinks it at least that much, so the answer is ``predict``'s to the
        bit. (``predict_image`` on the full-size pixels interpolates from those instead: the same
        boxes to a fraction of a pixel on small images, slightly different ones on photos several
        times the model's input size.)"""
        from focaldet.data.coco import decode_for_pipeline
        from focaldet.data.images import read_bytes
        from focaldet.data.transforms import reduction_for_resize
        from focaldet.structures.boxes import rescale_boxes

        what = f"image {path}"
        min_size, max_size = self.eval_size
        image, size = decode_for_pipeline(read_bytes(path, what), what,
                                          lambda h, w: reduction_for_resize(h, w, min_size, max_size))
        det = self.predict_image(image)
        det["boxes"] = rescale_boxes(det["boxes"], image.shape[:2], size)  # back to the file's pixels
        return det
