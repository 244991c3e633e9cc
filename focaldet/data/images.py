"""Reading image files: the decoder every dataset uses, and the one header reader.

`read_image` decodes a file to ``(H, W, 3)`` uint8 RGB with OpenCV (EXIF orientation
applied), optionally 2, 4 or 8 times smaller (libjpeg's DCT scaling). A JPEG that lost its
last bytes (an interrupted copy or download) is still read: OpenCV >= 5 refuses such a
file outright, so the decoder is given the missing end-of-image marker and decodes what is
there (the lost rows come out gray, as with PIL's ``LOAD_TRUNCATED_IMAGES``); the file on
disk is never modified. A reduced decode that fails falls back to the full decode.

`read_header` reads format, mode, size and EXIF orientation from the header alone.

An image whose header says it has more than `MAX_PIXELS` pixels is refused before it is
decoded (a "decompression bomb": a small file that decodes to gigabytes), by `read_image`
and `image_from_bytes` alike: datasets, ``Detector.predict`` and ``focaldet serve``.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from focaldet.errors import DataError
from focaldet.failures import unwrap_worker_message

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageError",
    "ImageHeader",
    "MAX_PIXELS",
    "check_pixels",
    "decode_image",
    "image_from_bytes",
    "is_truncated_jpeg",
    "list_images",
    "read_header",
    "read_image",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def list_images(folder: str | os.PathLike, what: str = "image folder") -> list[Path]:
    """The image files (`IMAGE_EXTENSIONS`, any case) under ``folder`` and its subfolders,
    sorted; `DataError` naming ``what`` and the folder when it is missing or holds none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{what} {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"{what} {folder} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files

# EXIF orientations that transpose the image (decoders apply them, headers do not).
TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})

_JPEG_SOI, _JPEG_EOI = b"\xff\xd8", b"\xff\xd9"

# The most pixels (h x w) an image may have: well below OpenCV's own 2^30, above any photo
# a detector is given (a 100 Mpx image is 300 MB decoded). The one home of this limit.
MAX_PIXELS = 100_000_000


class ImageError(DataError):
    """An image file is missing, unreadable or disagrees with its JSON entry.

    Raised from ``__getitem__``, so usually inside a DataLoader worker. PyTorch re-raises a
    worker's exception in the main process as ``type(exc)(text)`` where *text* is the whole
    worker traceback; this class trims that back to the one-line message (plus the worker
    it came from), so users still read ``cannot read image ...`` and not a traceback dump.
    """

    def __init__(self, message: str) -> None:
        super().__init__(unwrap_worker_message(message))


# --------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------

# OpenCV >= 4.11 decodes straight to RGB (libjpeg-turbo writes RGB): no BGR -> RGB pass.
_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)
_IMREAD_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def _imread_flags(reduce: int) -> int:
    """OpenCV flags decoding to RGB when OpenCV can (>= 4.11), else BGR, at ``1/reduce`` size."""
    if reduce not in (1, *_IMREAD_REDUCED):
        raise ValueError(f"reduce must be 1, 2, 4 or 8, got {reduce}")
    flags = cv2.IMREAD_COLOR if reduce == 1 else _IMREAD_REDUCED[reduce]
    return (flags & ~cv2.IMREAD_COLOR) | _IMREAD_RGB if _IMREAD_RGB else flags


def is_truncated_jpeg(buffer: np.ndarray) -> bool:
    """Whether the bytes of a file are a JPEG that does not end with its end-of-image
    marker (trailing padding of zeros or whitespace allowed): its last bytes are missing."""
    if buffer.size < 4 or bytes(buffer[:2]) != _JPEG_SOI:
        return False
    return bytes(buffer[-2:]) != _JPEG_EOI and bytes(buffer[-4096:]).rstrip(b"\x00\r\n\x1a ")[-2:] != _JPEG_EOI


def _decode(buffer: np.ndarray, flags: int) -> np.ndarray | None:
    """``cv2.imdecode``, repairing a truncated JPEG in memory (the end marker appended)."""
    image = cv2.imdecode(buffer, flags) if buffer.size else None
    if image is None and is_truncated_jpeg(buffer):
        image = cv2.imdecode(np.concatenate([buffer, np.frombuffer(_JPEG_EOI, np.uint8)]), flags)
    return image


def decode_image(buffer: np.ndarray, reduce: int = 1) -> np.ndarray | None:
    """Decode a file's bytes to ``(H, W, 3)`` uint8 RGB at ``1/reduce`` size (``ceil(H / reduce)``
    rows); ``None`` when the bytes are not a decodable image.

    A truncated JPEG is decoded (see the module docstring); when the reduced decode fails
    but the full one works, the full image is resized to the reduced size.
    """
    image = _decode(buffer, _imread_flags(reduce))
    if image is None and reduce > 1:
        image = _decode(buffer, _imread_flags(1))
        if image is not None:
            h, w = image.shape[:2]
            image = cv2.resize(image, (-(-w // reduce), -(-h // reduce)), interpolation=cv2.INTER_AREA)
    if image is None:
        return None
    return image if _IMREAD_RGB else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _header_pixels(buffer: np.ndarray) -> int | None:
    """``h * w`` from the header of an encoded image (``None``: PIL cannot read the header)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(buffer)) as image:
                w, h = image.size
        return int(w) * int(h)
    except Image.DecompressionBombError as e:  # PIL's own limit (2 x 89 Mpx): the size is in the text
        found = re.search(r"\((\d+) pixels\)", str(e))
        return int(found.group(1)) if found else MAX_PIXELS + 1
    except Exception:  # not an image PIL knows: the decoder says what it is
        return None


def check_pixels(h: int, w: int, what: str, max_pixels: int = MAX_PIXELS) -> None:
    """`ImageError` naming ``what`` when an ``h x w`` image is empty or has over ``max_pixels`` pixels."""
    if h <= 0 or w <= 0:
        raise ImageError(f"{what} is empty ({w}x{h} pixels)")
    if h * w > max_pixels:
        raise ImageError(f"{what} is too large: {h * w / 1e6:.0f} Mpx ({w}x{h}), over the limit of "
                         f"{max_pixels / 1e6:.0f} Mpx")


def image_from_bytes(buffer: np.ndarray | bytes, what: str, reduce: int = 1, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """`decode_image` of an encoded file's bytes, refusing (`ImageError` naming ``what``) an
    empty buffer, an image over ``max_pixels`` (from its header, before decoding) and bytes
    that are not a decodable image."""
    if isinstance(buffer, (bytes, bytearray, memoryview)):
        buffer = np.frombuffer(buffer, np.uint8)
    if buffer.size == 0:
        raise ImageError(f"cannot read {what}: not a decodable image (empty file)")
    pixels = _header_pixels(buffer)
    if pixels is not None and pixels > max_pixels:
        raise ImageError(f"cannot read {what}: {pixels / 1e6:.0f} Mpx, over the limit of {max_pixels / 1e6:.0f} Mpx "
                         "(a decompression bomb?)")
    image = decode_image(buffer, reduce)
    if image is None:
        raise ImageError(f"cannot read {what}: not a decodable image (corrupt or unsupported format)")
    return image


def read_bytes(path: str | os.PathLike, what: str) -> np.ndarray:
    """The bytes of an image file; `ImageError` naming ``what`` when it cannot be read."""
    try:
        return np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise ImageError(f"cannot read {what}: file not found") from None
    except OSError as e:
        raise ImageError(f"cannot read {what}: {e.strerror or e}") from None


def read_image(path: str | os.PathLike, image_id: int | None = None, reduce: int = 1) -> np.ndarray:
    """Decode an image file to ``(H, W, 3)`` uint8 RGB (EXIF orientation applied, as OpenCV does).

    ``reduce`` 2, 4 or 8 decodes it that many times smaller on each side (JPEG: scaled in
    the DCT, ``ceil(H / reduce)`` rows; other formats: resized by OpenCV).

    Raises `ImageError` naming the path (and the image id, when given) if the file is
    missing or cannot be decoded.
    """
    what = f"image {path}" + (f" (image id {image_id})" if image_id is not None else "")
    return image_from_bytes(read_bytes(path, what), what, reduce)


# --------------------------------------------------------------------------------------
# Headers
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says.

    ``size`` is ``(h, w)`` as `read_image` decodes it (EXIF orientation applied);
    ``stored_size`` is ``(h, w)`` before the orientation; ``mode`` is PIL's
    (``"RGB"``, ``"L"``, ``"RGBA"``, ``"I;16"``, ``"CMYK"``, ...).
    """

    format: str
    mode: str
    size: tuple[int, int]
    stored_size: tuple[int, int]
    orientation: int = 1


def read_header(source: str | os.PathLike | bytes | np.ndarray) -> ImageHeader | None:
    """The header of an image file (a path, or its bytes); ``None`` when PIL cannot read it
    (the full decode then says whether the file is an image at all)."""
    from PIL import Image, UnidentifiedImageError  # Pillow comes with torchvision

    if isinstance(source, np.ndarray):
        source = source.tobytes()
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            w, h = image.size
            orientation = image.getexif().get(0x0112, 1)
            fmt, mode = str(image.format), str(image.mode)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, TypeError, Image.DecompressionBombError):
        return None  # (a decompression bomb: `read_image` names it)
    orientation = orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1
    size = (w, h) if orientation in TRANSPOSING_ORIENTATIONS else (h, w)
    return ImageHeader(fmt, mode, size, (h, w), orientation)
