"""Case ``export``: the ONNX file (``focaldet export``) through onnxruntime against
focaldet's own PyTorch ``predict``, on the same images, the same detections checked.

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


def case_export(settings: Settings) -> dict[str, float]:
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
    with tempfile.TemporaryDirectory(prefix="focaldet-bench-") as tmp:
        log(settings, f"export: writing the ONNX file of ResNet-50-FPN at {s} px (a minute or more) ...")
        start = time.perf_counter()
        path = export_onnx(fd, cat_ids, [str(c) for c in cat_ids], Path(tmp) / "model.onnx")
        log(settings, f"export: exported in {time.perf_counter() - start:.0f} s")
        onnx = ExportedDetector(path, threads=settings.threads, spinning=False)  # no busy-wait into PyTorch's turn

    def onnxruntime_predict():
        return onnx(batch.numpy())

    def pytorch_predict():
        return fd.predict(images)

    with torch.inference_mode():
        got, ref = onnxruntime_predict(), pytorch_predict()
    lut = torch.tensor(cat_ids)
    fractions = [detections_match({"boxes": g["boxes"], "scores": g["scores"], "labels": g["category_ids"]},
                                  {**r, "labels": lut[r["labels"]]}, score_atol=1e-3, box_atol=0.5)
                 for g, r in zip(got, ref)]
    total = sum(len(r["scores"]) for r in ref)
    settings.notes["export"] = (f"onnxruntime vs PyTorch predict; {total} detections, "
                                + ("the same on both" if min(fractions) == 1.0 else
                                   f"worst image {100 * min(fractions):.1f}% matched")
                                + " (score 1e-3, box 0.5 px)")
    with torch.inference_mode():
        return compare("export", onnxruntime_predict, pytorch_predict, settings)


CASE = Case(case_export, unit="s", target=1.2)
