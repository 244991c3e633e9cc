"""Reading weights files, and ``init_weights``: copy every tensor whose name and shape match.

Files are read with ``torch.load(weights_only=True)``; a missing, truncated or foreign file
raises `WeightsError` naming it, in one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from focaldet.errors import WeightsError

__all__ = ["read_weights_file"]


def read_weights_file(path: str | os.PathLike, what: str = "weights file") -> Any:
    """``torch.load`` of a checkpoint or state dict file on the CPU, tensors only."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"{what} {path}: file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, unsafe globals, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"{what} {path}: not a readable PyTorch file ({reason[:200]})") from None
