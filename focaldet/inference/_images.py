"""What `focaldet.inference.Predictor` reads: paths, folders, arrays, PIL images and tensors
as the samples the eval pipeline makes (`ImageFolderDataset`'s decoder for files)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from focaldet.data.coco import ImageFolderDataset, _apply_transforms, decode_for_pipeline, pipeline_reduction
from focaldet.data.images import MAX_PIXELS, check_pixels, list_images
from focaldet.errors import DataError

__all__ = ["DecodedImage", "Images", "decode_bytes", "expand"]


@dataclass(frozen=True)
class DecodedImage:
    """An encoded image (an upload's bytes) decoded as the eval pipeline decodes a file:
    ``image`` ``(h, w, 3)`` uint8 RGB, at 1/2, 1/4 or 1/8 size when the eval resize allows
    (`focaldet.data.transforms.decode_reduction`); ``orig_size`` the full image's ``(H, W)``,
    which detections are mapped back to; ``name`` for messages."""

    image: np.ndarray
    orig_size: tuple[int, int]
    name: str


def decode_bytes(data: bytes | np.ndarray, what: str, transforms, max_pixels: int = MAX_PIXELS) -> DecodedImage:
    """An encoded image's bytes as `ImageFolderDataset` reads a file of them
    (`focaldet.data.coco.decode_for_pipeline`; ``transforms``: the eval pipeline, which says how
    small the decode may be)."""
    buffer = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    image, size = decode_for_pipeline(buffer, what, pipeline_reduction(transforms), max_pixels)
    return DecodedImage(image, tuple(size), what)


class Images(ImageFolderDataset):
    """Paths, arrays, PIL images and tensors as the samples the eval pipeline makes; paths
    are read as `ImageFolderDataset` reads them (reduced decoding included)."""

    def __init__(self, items: Sequence[Any], transforms) -> None:
        self.items, self.transforms = list(items), transforms

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        if isinstance(item, Path):
            image, (h, w) = self._read(item, index)
            name = str(item)
        elif isinstance(item, DecodedImage):
            image, (h, w), name = item.image, item.orig_size, item.name
        else:
            image = _to_rgb_array(item, index)
            (h, w), name = image.shape[:2], f"<input {index}>"
        sample = _apply_transforms(self.transforms, image, np.zeros((0, 4), np.float32), np.zeros((0,), np.int64))
        sample.update(image_id=index, orig_size=(int(h), int(w)), file_name=name)
        return sample


def _to_rgb_array(item: Any, index: int) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB from a numpy array, a PIL image or a ``(3, H, W)`` tensor; an
    empty image or one over `focaldet.data.images.MAX_PIXELS` is refused, as a file is."""
    image = _rgb_array(item, index)
    check_pixels(*image.shape[:2], f"input {index}")
    return image


def _rgb_array(item: Any, index: int) -> np.ndarray:
    if isinstance(item, Tensor):
        if item.ndim != 3 or item.shape[0] != 3:
            raise DataError(f"input {index}: a tensor image must be (3, H, W), got {tuple(item.shape)}")
        check_pixels(*item.shape[1:], f"input {index}")
        if item.is_floating_point():  # [0, 1] floats -> the uint8 the eval pipeline decodes to
            lo, hi = float(item.min()), float(item.max())
            if not (0.0 <= lo and hi <= 1.0):  # never clamp 0..255 floats to a binary image
                raise DataError(f"input {index}: a float tensor image must be in [0, 1], got values in "
                                f"[{lo:g}, {hi:g}] (divide by 255, or give a uint8 tensor)")
            item = (item.detach().float() * 255).round().to(torch.uint8)
        elif item.dtype != torch.uint8:
            raise DataError(f"input {index}: a tensor image must be float in [0, 1] or uint8, got {item.dtype}")
        return np.ascontiguousarray(item.permute(1, 2, 0).cpu().numpy())  # (3, H, W) -> (H, W, 3)
    if hasattr(item, "convert") and hasattr(item, "size"):  # PIL.Image
        return np.asarray(item.convert("RGB"))
    if isinstance(item, np.ndarray):
        if item.ndim == 2:
            item = np.repeat(item[:, :, None], 3, axis=2)
        if item.ndim != 3 or item.shape[2] != 3 or item.dtype != np.uint8:
            raise DataError(f"input {index}: a numpy image must be (H, W, 3) uint8 RGB, "
                            f"got {item.shape} {item.dtype}")
        return np.ascontiguousarray(item)
    raise DataError(f"input {index}: cannot read {type(item).__name__} as an image "
                    "(give a path, a folder, an (H, W, 3) uint8 array, a PIL image or a (3, H, W) tensor)")


def expand(inputs: Any) -> list[Any]:
    """A path, a folder, or a list of them and of in-memory images -> a flat list."""
    if isinstance(inputs, (str, os.PathLike)):
        path = Path(inputs).expanduser()
        if path.is_dir():
            return list_images(path)
        return [path]
    if isinstance(inputs, (list, tuple)):
        return [x for item in inputs for x in (expand(item) if isinstance(item, (str, os.PathLike)) else [item])]
    return [inputs]
