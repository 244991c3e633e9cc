"""Test-time augmentation: horizontal flip and multi-scale, merged by class-wise NMS.

Each image is run as several *views*: at every scale of ``TTA.scales`` (the shorter side the
eval resize goes to; none = the eval size of `InputSettings`), and with ``flip`` also
mirrored left-right. Each view goes through the eval pipeline (resize, pad) and the model
like any image; its detections come back in the original pixels, a flipped view's boxes
mirrored back (`flip_boxes`), and the views' detections of an image are merged.

The merge is class-wise NMS (`focaldet.inference.slicing.merge_detections`, as slicing and
the postprocess; detectron2's and MMDetection's default TTA merge too), not weighted box
fusion: the views of one model agree to within a pixel or two on a well-detected object, so
averaging coordinates buys little, while WBF needs its own IoU threshold and rescales the
scores by how many views found a box, which shifts the F1 thresholds ``validate`` computes.
NMS keeps every output a box one view produced, with that view's score.

The pieces, paired and pure: `flip_boxes` (its own inverse), `view_settings`, and the
driver `tta_detections`, which takes the same per-batch ``detect`` callable as
`focaldet.inference.slicing.sliced_detections`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from focaldet.config.recipe import dataclass_of
from focaldet.errors import ConfigError
from focaldet.inference.slicing import merge_detections
from focaldet.config.inputs import InputSettings

__all__ = ["TTA", "flip_boxes", "tta_detections", "view_settings"]


@dataclass(frozen=True)
class TTA:
    """Which views test-time augmentation runs (``--model.tta.flip true --model.tta.scales
    [480,640,800]`` on the CLI once wired into the predictor).

    Args:
        flip: also run every scale mirrored left-right.
        scales: shorter sides (pixels) of the eval resize, one view each; the longer side's
            cap scales along (``max_size * s / min_size``). Empty: the eval size only.
    """

    flip: bool = False
    scales: Sequence[int] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        scales = tuple(self.scales or ())
        bad = [s for s in scales if not isinstance(s, int) or isinstance(s, bool) or s < 1]
        if bad:
            raise ConfigError(f"tta.scales must be positive numbers of pixels, got {bad}")
        object.__setattr__(self, "scales", scales)  # a tuple: hashable, immutable

    @classmethod
    def of(cls, value: TTA | Mapping[str, Any] | None) -> TTA | None:
        """A `TTA` from itself, a mapping of its fields (YAML, checkpoints) or None."""
        return dataclass_of(cls, value, "tta")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "scales": list(self.scales)}

    @property
    def num_views(self) -> int:
        return max(1, len(self.scales)) * (2 if self.flip else 1)


def flip_boxes(boxes: Tensor, width: int | float) -> Tensor:
    """``xyxy`` boxes ``(M, 4)`` of an image ``width`` pixels wide <-> the same boxes in the
    image mirrored left-right (``x -> width - x``; its own inverse, exact in float)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([width - x2, y1, width - x1, y2], -1)  # 4 x (M,) -> (M, 4)


def view_settings(inputs: InputSettings, scale: int | None) -> InputSettings:
    """The eval settings of one view: ``inputs`` with the shorter side at ``scale`` and the
    longer side's cap scaled by the same factor (``None``: ``inputs`` unchanged)."""
    if scale is None or scale == inputs.min_size:
        return inputs
    if inputs.eval_transforms is not None or inputs.min_size is None:
        raise ConfigError("tta.scales needs the standard eval resize (data.min_size/max_size); "
                          "this model's data has custom eval_transforms or no resize")
    max_size = max(scale, round(inputs.max_size * scale / inputs.min_size))
    return InputSettings(scale, max_size, inputs.size_divisibility)


def tta_detections(images: Sequence[Tensor], detect: Callable[[dict], list[dict[str, Tensor]]], tta: TTA,
                   inputs: InputSettings, iou_threshold: float, max_dets: int,
                   batch_size: int = 8) -> list[dict[str, Tensor]]:
    """Detections of original-resolution images, merged over the views of ``tta``.

    Args:
        images: ``(3, H, W)`` uint8 RGB images at their original resolution (CPU tensors).
        detect: runs the model on a collated batch (``focaldet.data.transforms.collate_detection``)
            and returns each image's detections in its ``orig_sizes`` pixels (as
            ``RetinaNetModule._detect``; the same callable `sliced_detections` takes).
        tta: the views.
        inputs: the model's eval settings; each scale replaces its ``min_size``.
        iou_threshold, max_dets: the merge's NMS threshold and per-image cap (the model's
            ``postprocess.nms_thresh`` and ``detections_per_img``).
        batch_size: images per forward pass (one view at a time).

    Returns ``[{"boxes": (M, 4) xyxy in image pixels, "scores": (M,), "labels": (M,)}]``, one
    per image, sorted by decreasing score.
    """
    from focaldet.data.coco import _apply_transforms
    from focaldet.data.transforms import collate_detection

    found: list[list[dict[str, Tensor]]] = [[] for _ in images]
    empty_boxes, empty_labels = np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)
    for scale in (tta.scales or (None,)):
        settings = view_settings(inputs, scale)
        transforms = settings.eval_pipeline()
        for flip in ((False, True) if tta.flip else (False,)):
            for start in range(0, len(images), batch_size):
                samples = []
                for j, image in enumerate(images[start:start + batch_size]):
                    hwc = image.permute(1, 2, 0).numpy()  # (3, H, W) -> (H, W, 3)
                    hwc = np.ascontiguousarray(hwc[:, ::-1] if flip else hwc)
                    sample = _apply_transforms(transforms, hwc, empty_boxes, empty_labels)
                    sample.update(image_id=start + j, orig_size=tuple(image.shape[-2:]), file_name="")
                    samples.append(sample)
                batch = collate_detection(samples, settings.size_divisibility)
                for j, det in enumerate(detect(batch)):
                    i = start + j
                    boxes = flip_boxes(det["boxes"], images[i].shape[-1]) if flip else det["boxes"]
                    found[i].append({"boxes": boxes, "scores": det["scores"], "labels": det["labels"]})
    return [merge_detections(dets, iou_threshold, max_dets) for dets in found]
