"""The exportable detector: one module from input pixels to padded detections.

``ExportableDetector(model, category_ids)`` wraps a `RetinaNet` so that its forward is what
``predict`` does, in tensor operations that ``torch.export`` and the ONNX exporter can trace
with the batch size, height and width left dynamic::

    images (N, 3, H, W) float32 RGB in [0, 1]
      -> resize: shorter side to min_size, longer side capped at max_size (the data
         pipeline's eval rule, `focaldet.config.inputs.resized_size` itself), interpolated as the
         pipeline's OpenCV INTER_LINEAR_EXACT to the bit (`resize_bilinear_exact`)
      -> normalise (pixel_mean, pixel_std) -> pad right/below to size_divisibility
      -> backbone, FPN, head; anchors from the feature shapes
      -> `PostProcess.padded`: top-k, decode, clip, class-aware NMS, top D
      -> boxes back to input pixels, contiguous labels -> the dataset's category ids
    boxes (N, D, 4) float32 xyxy, scores (N, D), labels (N, D) int64 category ids
    (-1 in padding), num_detections (N,) int64

All images of a batch share one (H, W), hence one resized size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from focaldet.config.inputs import resized_size
from focaldet.modeling.retinanet import RetinaNet

OUTPUT_NAMES = ("boxes", "scores", "labels", "num_detections")


def eval_size(h, w, min_size: int | None, max_size: int | None):
    """``(oh, ow)``: the data pipeline's eval resize, `focaldet.config.inputs.resized_size` itself (exact
    integer arithmetic: plain ints for ints, symbolic ones under ``torch.export``)."""
    return resized_size(h, w, min_size, max_size)


class ExportableDetector(nn.Module):
    """``images (N, 3, H, W)`` in [0, 1] -> ``(boxes, scores, labels, num_detections)`` (see
    the module docstring); ``model``'s own ``min_size``, ``max_size``, ``size_divisibility``,
    ``pixel_mean``, ``pixel_std`` and ``postprocess`` settings are used."""

    def __init__(self, model: RetinaNet, category_ids: Sequence[int]):
        super().__init__()
        if len(category_ids) != model.num_classes:
            raise ValueError(f"{len(category_ids)} category ids for a model of {model.num_classes} classes")
        self.model = model
        self.register_buffer("category_ids", torch.tensor(list(category_ids), dtype=torch.int64), persistent=False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        m = self.model
        n, _, h, w = images.shape
        oh, ow = (_opaque(v) for v in eval_size(h, w, m.min_size, m.max_size))  # fresh symbols under export
        x = resize_bilinear_exact((images * 255).round(), oh, ow) / 255  # (N, 3, oh, ow), the pipeline's pixels
        x = (x - m.pixel_mean) / m.pixel_std
        d = m.size_divisibility
        ph, pw = _opaque((oh + d - 1) // d) * d, _opaque((ow + d - 1) // d) * d  # the padded size
        x = F.pad(x, (0, pw - ow, 0, ph - oh))  # zeros right/below: (N, 3, ph, pw)
        x = x.contiguous(memory_format=m.memory_format)
        features = m.fpn(m.backbone(x))
        cls_logits, box_deltas = m.head(features)  # per level (N, Hi*Wi*A, C), (N, Hi*Wi*A, 4)
        anchors = level_anchors(m, [f.shape[-2:] for f in features], x.shape[-2:], x.device)
        sizes = torch.tensor([oh, ow], device=x.device).expand(n, 2)  # (N, 2)
        if m.background_logit:
            dets = m.postprocess.padded([m.scores(t) for t in cls_logits], box_deltas, anchors, sizes, m.box_coder)
        else:  # as RetinaNet.detect: top-k on the logits, sigmoid on the selected only
            dets = m.postprocess.padded(cls_logits, box_deltas, anchors, sizes, m.box_coder, score_fn=torch.sigmoid)
        scale = torch.tensor([w / ow, h / oh, w / ow, h / oh], device=x.device)  # back to input pixels
        labels = torch.where(dets["labels"] >= 0, self.category_ids[dets["labels"].clamp(min=0)], -1)
        return dets["boxes"] * scale, dets["scores"], labels, dets["num_detections"]


def _opaque(n):
    """``n`` itself; under ``torch.export``, a symbolic ``n`` becomes a fresh symbol of the same
    value (runtime checks: ``u >= 1`` and ``u == n``). The resized size is a Min/Max/floor
    expression of the input size, which the tracer would otherwise carry through the shape of
    every node after it; as fresh symbols ``oh`` and ``ow``, and the padded size as ``d * u``,
    the backbone's shapes are short (``16 * u``, ...). Measured with ResNet-50 on 2 cores: a
    .pt2 loads in 10 s instead of 77 s (the load parses every shape with sympy), writing it
    takes 9 s instead of 22 s and an ONNX file 31 s instead of 55 s; the outputs are bit-equal."""
    if isinstance(n, int):
        return n
    u = torch.scalar_tensor(n, dtype=torch.int64).item()
    torch._check(u >= 1)
    torch._check(u == n)
    return u


def _linear_exact_taps(src: int, dst: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """OpenCV ``INTER_LINEAR_EXACT``'s taps along one axis of ``src`` -> ``dst`` pixels:
    ``(i0, i1, w)``, each ``(dst,)``: output pixel ``p`` is ``((256 - w) * in[i0] + w * in[i1]) / 256``.

    The source coordinate ``(p + 1/2) src / dst - 1/2`` in exact integer arithmetic (the
    fraction ``num / den``, ``den = 2 dst``); its fractional part as an 8-bit weight rounded
    half to even (OpenCV's ``softdouble`` -> ``ufixedpoint16``); coordinates before the first
    pixel or past the last take that pixel alone. Works on symbolic sizes."""
    p = torch.arange(dst, device=device)  # (dst,) int64
    den = 2 * dst
    num = ((2 * p + 1) * src - dst).clamp(min=0)  # < 0: before pixel 0 -> pixel 0, weight 0
    idx = torch.div(num, den, rounding_mode="floor")
    scaled = (num - idx * den) * 256  # the fraction's remainder, in 1/256 units times den
    q = torch.div(scaled, den, rounding_mode="floor")
    r = scaled - q * den
    w = q + ((2 * r > den) | ((2 * r == den) & (q % 2 == 1))).to(q.dtype)  # round half to even
    w = torch.where(idx >= src - 1, torch.zeros_like(w), w)  # at or past the last pixel: it alone
    i0 = idx.clamp(max=src - 1)
    return i0, (i0 + 1).clamp(max=src - 1), w.to(torch.float32)


def resize_bilinear_exact(images: Tensor, oh, ow) -> Tensor:
    """``images (N, C, H, W)`` of integer values 0..255 (as float32) resized to ``(N, C, oh, ow)``
    exactly as ``cv2.resize(..., interpolation=cv2.INTER_LINEAR_EXACT)`` resizes uint8 -- the
    data pipeline's `ResizeShortestEdge` -- re-expressed in tensor operations that export
    (tests/test_export_resize.py checks it bit for bit on many size pairs).

    8-bit weights per axis, one rounded sum: ``(Σ wy wx in + 2^15) >> 16``. Every intermediate
    is an integer below 2^24, so float32 holds it exactly (and ONNX runtimes need no integer
    kernels)."""
    h, w = images.shape[-2:]
    y0, y1, wy = _linear_exact_taps(h, oh, images.device)
    x0, x1, wx = _linear_exact_taps(w, ow, images.device)
    top, bottom = images.index_select(2, y0), images.index_select(2, y1)  # (N, C, oh, W) each
    upper = top.index_select(3, x0) * (256 - wx) + top.index_select(3, x1) * wx  # (N, C, oh, ow), < 2^16
    lower = bottom.index_select(3, x0) * (256 - wx) + bottom.index_select(3, x1) * wx
    wy = wy[:, None]  # (oh, 1)
    return torch.floor((upper * (256 - wy) + lower * wy + 32768) / 65536)


def level_anchors(model: RetinaNet, feature_shapes, padded_size, device) -> list[Tensor]:
    """Per level ``(Hi*Wi*A, 4)`` anchors, as ``model.anchor_generator`` makes them, from
    shapes that may be symbolic (the generator's cache keys on ints, which would fix them)."""
    gen = model.anchor_generator
    if gen.torchvision_compat:
        strides = [(padded_size[0] // h, padded_size[1] // w) for h, w in feature_shapes]
    else:
        strides = [(s, s) for s in gen.strides]
    return [gen._grid(c, st, (h, w), device).anchors()
            for c, st, (h, w) in zip(gen._cells, strides, feature_shapes)]
