"""Cases ``export``, ``export_int8``, ``export_openvino``: the exported file (fp32 ONNX
through onnxruntime; int8 ONNX; OpenVINO IR) against focaldet's own PyTorch ``predict``, on
the same images, the detections checked (int8 with looser tolerances).

The focaldet column is onnxruntime, the torchvision column focaldet's PyTorch ``predict``
(both with the frozen BN folded); ratio = PyTorch / onnxruntime seconds. CPU only
(onnxruntime's CPU provider); images of the eval size, so neither side resizes.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from focaldet.bench.harness import Case, Settings, compare, detections_match, log
from focaldet.bench.models import build_pair


def _case(settings: Settings, fmt: str = "onnx") -> dict[str, float]:
    """``fmt``: ``onnx`` (fp32, onnxruntime), ``int8`` (onnxruntime, QDQ convolutions calibrated on
    8 random images of the eval size) or ``openvino`` (IR converted from the fp32 ONNX)."""
    from focaldet.export import ExportedDetector, export_onnx

    n, s = settings.batch, settings.size
    cpu = Settings(**{**settings.__dict__, "device": "cpu"})
    _, fd = build_pair(cpu, s, frozen_bn=False, cls_bias=-1.5)
    fd.eval().fuse_batchnorm()
    fd.min_size, fd.max_size = s, s  # the eval size: inputs of that size are not resized
    cat_ids = list(range(1, settings.num_classes + 1))
    gen = torch.Generator().manual_seed(settings.seed + 8)
    batch = torch.rand(n, 3, s, s, generator=gen)
    images = list(batch)
    name = "export" if fmt == "onnx" else f"export_{fmt}"
    with tempfile.TemporaryDirectory(prefix="focaldet-bench-") as tmp:
        log(settings, f"{name}: writing the ONNX file of ResNet-50-FPN at {s} px (a minute or more) ...")
        start = time.perf_counter()
        path = export_onnx(fd, cat_ids, [str(c) for c in cat_ids], Path(tmp) / "model.onnx")
        if fmt == "int8":
            from PIL import Image

            from focaldet.export.formats import quantize_int8

            (Path(tmp) / "calib").mkdir()
            for i in range(8):
                pixels = (torch.rand(s, s, 3, generator=gen) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(Path(tmp) / "calib" / f"{i}.png")
            path = quantize_int8(path, Path(tmp) / "model.int8.onnx", Path(tmp) / "calib", count=8)
        elif fmt == "openvino":
            from focaldet.export.formats import export_openvino

            path = export_openvino(path, Path(tmp) / "model.xml")
        log(settings, f"{name}: exported in {time.perf_counter() - start:.0f} s")
        onnx = ExportedDetector(path, threads=settings.threads, spinning=False)  # no busy-wait into PyTorch's turn

    def exported_predict():
        return onnx(batch.numpy())

    def pytorch_predict():
        return fd.predict(images)

    with torch.inference_mode():
        got, ref = exported_predict(), pytorch_predict()
    lut = torch.tensor(cat_ids)
    score_atol, box_atol = (0.05, 4.0) if fmt == "int8" else (1e-3, 0.5)
    fractions = [detections_match({"boxes": g["boxes"], "scores": g["scores"], "labels": g["category_ids"]},
                                  {**r, "labels": lut[r["labels"]]}, score_atol=score_atol, box_atol=box_atol)
                 for g, r in zip(got, ref)]
    total = sum(len(r["scores"]) for r in ref)
    runtime = {"onnx": "onnxruntime fp32", "int8": "onnxruntime int8", "openvino": "OpenVINO fp32"}[fmt]
    settings.notes[name] = (f"{runtime} vs PyTorch predict; {total} detections, "
                            + ("the same on both" if min(fractions) == 1.0 else
                               f"worst image {100 * min(fractions):.1f}% matched")
                            + f" (score {score_atol:g}, box {box_atol:g} px)")
    with torch.inference_mode():
        return compare(name, exported_predict, pytorch_predict, settings)


def case_export(settings: Settings) -> dict[str, float]:
    return _case(settings, "onnx")


def case_export_int8(settings: Settings) -> dict[str, float]:
    return _case(settings, "int8")


def case_export_openvino(settings: Settings) -> dict[str, float]:
    return _case(settings, "openvino")


CASE = Case(case_export, unit="s", target=1.2)
CASE_INT8 = Case(case_export_int8, unit="s", target=1.5)
CASE_OPENVINO = Case(case_export_openvino, unit="s", target=1.2)
