"""The export graph's resize is the data pipeline's, to the bit: `resize_bilinear_exact` against
OpenCV's INTER_LINEAR_EXACT (what `ResizeShortestEdge` runs) on many size pairs, in PyTorch and
through onnxruntime with the sizes left dynamic."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from focaldet.data.transforms import ResizeShortestEdge
from focaldet.export.graph import eval_size, resize_bilinear_exact

PAIRS = [((480, 640), (256, 341)), ((480, 640), (240, 320)), ((97, 131), (194, 262)), ((1080, 1920), (750, 1333)),
         ((64, 64), (64, 64)), ((33, 47), (12, 17)), ((33, 47), (36, 42)), ((5, 7), (1, 1)), ((40, 30), (5, 200)),
         ((1, 1), (3, 4)), ((301, 299), (800, 797)), ((128, 200), (82, 128))]


def _ours(image: np.ndarray, oh: int, ow: int) -> np.ndarray:
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()  # (1, 3, H, W)
    return resize_bilinear_exact(x, oh, ow)[0].permute(1, 2, 0).numpy().astype(np.uint8)


@pytest.mark.parametrize(("size", "out"), PAIRS)
def test_resize_is_opencv_linear_exact_bit_for_bit(size, out):
    image = np.random.default_rng(sum(size)).integers(0, 256, (*size, 3), dtype=np.uint8)
    expected = cv2.resize(image, out[::-1], interpolation=cv2.INTER_LINEAR_EXACT)
    np.testing.assert_array_equal(_ours(image, *out), expected)


def test_the_pipeline_resize_and_the_graph_resize_give_the_same_pixels():
    """`ResizeShortestEdge` (the eval pipeline) and the graph's size rule plus resize agree on
    every pixel, including sizes whose rounding is a tie."""
    rng = np.random.default_rng(0)
    for h, w in [(480, 640), (375, 500), (1080, 1920), (150, 100), (333, 333)]:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for min_size, max_size in [(256, 512), (800, 1333), (96, 128)]:
            ours = _ours(image, *eval_size(h, w, min_size, max_size))
            np.testing.assert_array_equal(ours, ResizeShortestEdge(min_size, max_size)(image=image)["image"])


@pytest.mark.slow  # trains (a fit), exports or starts a process: see docs/testing.md
def test_resize_exports_to_onnx_with_dynamic_sizes(tmp_path):
    """The resize, exported once with dynamic height and width, matches OpenCV at other sizes."""
    ort = pytest.importorskip("onnxruntime")

    class Resize(torch.nn.Module):
        def forward(self, images):
            oh, ow = eval_size(images.shape[-2], images.shape[-1], 96, 128)
            return resize_bilinear_exact(images, oh, ow)

    h, w = torch.export.Dim("h", min=2, max=4096), torch.export.Dim("w", min=2, max=4096)
    path = tmp_path / "resize.onnx"
    torch.onnx.export(Resize().eval(), (torch.zeros(1, 3, 64, 80),), str(path), dynamo=True,
                      dynamic_shapes={"images": {2: h, 3: w}}, input_names=["images"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for size in [(480, 640), (97, 131), (150, 100), (33, 47)]:
        image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        (got,) = session.run(None, {"images": image.transpose(2, 0, 1)[None].astype(np.float32)})
        expected = ResizeShortestEdge(96, 128)(image=image)["image"]
        np.testing.assert_array_equal(got[0].transpose(1, 2, 0).astype(np.uint8), expected)
