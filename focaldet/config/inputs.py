"""`InputSettings`: the one home of how an image is prepared for evaluation and inference.

The data module's eval pipeline, ``RetinaNet.predict``, ``focaldet.load``'s `Detector`, the
exporters and the doctor all read these values, and checkpoints store them, so a model
trained at 256 px is also run at 256 px wherever it goes.

Training-time augmentation (multi-scale sizes, flips) is the data module's business and
not stored here: only what evaluation needs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["InputSettings", "resized_size", "shortest_edge_scale"]


def shortest_edge_scale(h: int, w: int, min_size: int, max_size: int) -> float:
    """The scale that brings the shorter side of an ``h x w`` image to ``min_size`` unless
    the longer side would then exceed ``max_size`` (detectron2's rule), as a float (for
    decode reductions and torchvision's resize); the size it gives is `resized_size`."""
    return min(min_size / min(h, w), max_size / max(h, w))


def resized_size(h, w, min_size: int | None, max_size: int):
    """``(H, W)`` of an ``h x w`` image after the eval resize -- THE resize rule, used by
    `ResizeShortestEdge` (so by every data pipeline and `focaldet.inference.Predictor`), the
    export graph, the doctor and the anchor analysis: each side times
    `shortest_edge_scale`, rounded half up, at least 1 px; ``min_size=None``: not resized.

    Exact integer arithmetic: ``floor(x * a / b + 1/2) = (2 x a + b) // (2 b)``, and the min
    of the two rounded candidates is the rounded min (rounding is monotone). It works on
    plain ints and on the symbolic sizes of ``torch.export`` (``torch.sym_min``/``sym_max``
    return plain ints for ints)."""
    if min_size is None:
        return h, w
    import torch

    short, long = torch.sym_min(h, w), torch.sym_max(h, w)

    def rounded(x):
        size = torch.sym_min((2 * x * min_size + short) // (2 * short), (2 * x * max_size + long) // (2 * long))
        return torch.sym_max(size, 1)

    return rounded(h), rounded(w)


@dataclass(frozen=True)
class InputSettings:
    """How evaluation and inference prepare an image.

    Args:
        min_size: the shorter side after the eval resize (the RetinaNet paper's 800);
            ``None``: no resize.
        max_size: cap on the longer side after the eval resize (1333).
        size_divisibility: batches are zero-padded to a multiple of this (128 = the P7 stride).
        eval_transforms: a custom eval pipeline (albumentations config list, see
            ``focaldet.data.transforms``) replacing ``ResizeShortestEdge(min_size, max_size)``;
            ``min_size``/``max_size`` then describe its leading resize (see `from_data`).
    """

    min_size: int | None = 800
    max_size: int = 1333
    size_divisibility: int = 128
    eval_transforms: tuple[dict, ...] | None = None

    @classmethod
    def from_data(cls, min_size: int | Sequence[int] = 800, max_size: int = 1333, size_divisibility: int = 128,
                  eval_transforms: Sequence[Mapping[str, Any]] | None = None) -> InputSettings:
        """The eval settings of a data module's arguments: a multi-scale ``min_size`` list
        evaluates at its largest value; a custom ``eval_transforms`` list gives the sizes
        of its leading ``ResizeShortestEdge`` (none: ``min_size=None``, no resize known)."""
        if eval_transforms is not None:
            first = dict(eval_transforms[0]) if eval_transforms else {}
            if first.get("name") == "ResizeShortestEdge" and first.get("p", 1.0) >= 1:
                min_size, max_size = first.get("min_size", 800), first.get("max_size", 1333)
            else:
                min_size = None
            eval_transforms = tuple(dict(t) for t in eval_transforms)
        if min_size is not None and not isinstance(min_size, int):
            min_size = max(int(s) for s in min_size)
        return cls(min_size, int(max_size), int(size_divisibility), eval_transforms)

    def eval_pipeline(self):
        """The albumentations eval pipeline (what ``validate`` runs on every image)."""
        from focaldet.data.transforms import build_transforms

        if self.eval_transforms is None and self.min_size is None:
            return build_transforms(False, transforms=[])
        transforms = None if self.eval_transforms is None else [dict(t) for t in self.eval_transforms]
        return build_transforms(False, self.min_size or 800, self.max_size, transforms=transforms)

    def resized_size(self, h: int, w: int) -> tuple[int, int]:
        """``(H, W)`` of an ``h x w`` image after these settings' eval resize (`resized_size`)."""
        return resized_size(h, w, self.min_size, self.max_size)

    def padded_size(self, h: int, w: int) -> tuple[int, int]:
        """``(H, W)`` of a prepared ``h x w`` image padded alone to ``size_divisibility``
        (the batch rule of `focaldet.inference.Predictor`)."""
        d = max(int(self.size_divisibility), 1)
        return -(-int(h) // d) * d, -(-int(w) // d) * d

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (stored in checkpoints, loaded with ``weights_only=True``)."""
        d = asdict(self)
        d["eval_transforms"] = None if self.eval_transforms is None else [dict(t) for t in self.eval_transforms]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | InputSettings | None) -> InputSettings:
        if d is None:
            return cls()
        if isinstance(d, InputSettings):
            return d
        t = d.get("eval_transforms")
        return cls(d.get("min_size", 800), int(d.get("max_size", 1333)), int(d.get("size_divisibility", 128)),
                   None if t is None else tuple(dict(x) for x in t))

    def data_args(self) -> dict[str, Any]:
        """``CocoDataModule`` arguments that reproduce these eval settings."""
        args: dict[str, Any] = {"max_size": self.max_size, "size_divisibility": self.size_divisibility}
        if self.min_size is not None:
            args["min_size"] = self.min_size
        if self.eval_transforms is not None:
            args["eval_transforms"] = [dict(t) for t in self.eval_transforms]
        return args

    def predict_args(self) -> dict[str, Any]:
        """``RetinaNet`` arguments for its own ``predict`` (resize in the model, for tensors)."""
        return {"min_size": self.min_size, "max_size": self.max_size, "size_divisibility": self.size_divisibility}
