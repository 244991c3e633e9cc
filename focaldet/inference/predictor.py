"""`Predictor`: the one inference path, from an image to its detections in the dataset's terms.

Every door that runs a trained model goes through it -- ``validate``/``test``/``predict``
(``RetinaNetModule``), ``focaldet.load(...).predict`` (`focaldet.api.Detector`), ``focaldet
serve`` and the reference of the export checks -- so the same image gives the same
detections whichever door it takes (detectron2's ``DefaultPredictor`` is the model)::

    image (path, array, PIL, tensor)
      -> prepare: focaldet's decoder, the eval pipeline of `InputSettings` (the one resize
         rule, `focaldet.config.inputs.shortest_edge_scale`), collate
      -> detect_prepared: pad each image ALONE to size_divisibility, normalise, model, postprocess
      -> to_original: boxes back to the image's own pixels
      -> finish: score thresholds (a number or validate's thresholds.json), category ids, names

**The batch rule.** An image's detections do not depend on which other images share its
batch: each prepared image is padded alone to a multiple of ``size_divisibility`` (the
padding changes what the convolutions see near the border), and the images of a batch whose
padded sizes differ run in separate forward passes (one per size; a batch of equal-size
images is one pass, as before). Training batches are unaffected.

Hooks for wrappers (test-time augmentation, slicing): `prepare` turns inputs into samples,
`collate` makes a batch, `detect_prepared` runs the model on one prepared batch and returns
detections in the batch's pixels, `to_original` maps them back, `finish` applies the
thresholds and names.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from focaldet.config.recipe import dataclass_of
from focaldet.errors import DataError
from focaldet.evaluation.thresholds import ALL, load_thresholds, per_label_thresholds
from focaldet.errors import ConfigError
from focaldet.inference.slicing import Slicing, sliced_detections
from focaldet.inference.tta import TTA, tta_detections
from focaldet.config.inputs import InputSettings
from focaldet.structures.boxes import rescale_boxes

__all__ = ["PredictionSettings", "Predictor", "read_thresholds", "size_groups"]


@dataclass
class PredictionSettings:
    """What ``predict`` keeps and draws (``RetinaNetModule(prediction=...)``,
    ``--model.prediction.score_threshold thresholds.json``).

    Args:
        score_threshold: keep detections scoring at least this: a number, or the path of a
            ``thresholds.json`` written by ``validate`` (per class). Default: everything the
            postprocess keeps.
        draw: ``predict`` also writes each image with its detections drawn.
        draw_score_threshold: the lowest score drawn (``validate`` draws at the F1 thresholds
            it computes).
    """

    score_threshold: float | str | None = None
    draw: bool = False
    draw_score_threshold: float = 0.3

    @classmethod
    def of(cls, value: PredictionSettings | Mapping[str, Any] | None) -> PredictionSettings:
        """From itself, a mapping of its fields (YAML, checkpoints) or None (the defaults)."""
        return dataclass_of(cls, value, "prediction") or cls()


def size_groups(image_sizes: Tensor, size_divisibility: int) -> list[tuple[tuple[int, int], list[int]]]:
    """The batch rule: ``[((Hp, Wp), [batch indices])]``, the images of a batch grouped by the
    size each pads to alone (``image_sizes (N, 2)`` rounded up to ``size_divisibility``), in
    order of first appearance."""
    d = max(int(size_divisibility), 1)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (h, w) in enumerate(image_sizes.tolist()):
        groups.setdefault((-(-h // d) * d, -(-w // d) * d), []).append(i)
    return list(groups.items())


def read_thresholds(score_threshold: Any, names: Sequence[str]) -> Tensor | None:
    """Per-class thresholds ``(K,)`` from a number, a ``{name: score}`` mapping or a
    ``thresholds.json`` of ``focaldet validate`` (read by `load_thresholds`; its "all" entry
    stands in for a class without its own score, and classes it omits keep every detection)."""
    if score_threshold is None:
        return None
    source = score_threshold
    if isinstance(score_threshold, (str, os.PathLike)):
        score_threshold = load_thresholds(score_threshold)
    if isinstance(score_threshold, Mapping):
        unknown = sorted(set(score_threshold) - set(names) - {ALL})
        if unknown:
            where = f"{source} " if isinstance(source, (str, os.PathLike)) else ""
            raise DataError(f"score thresholds {where}name unknown classes {unknown}; "
                            f"the model's classes are {list(names)}")
        score_threshold = {k: (v.get("score") if isinstance(v, Mapping) else v) for k, v in score_threshold.items()}
        score_threshold = {k: float(v) for k, v in score_threshold.items() if v is not None}
    elif not isinstance(score_threshold, (int, float)) or isinstance(score_threshold, bool):
        raise DataError(f"score_threshold must be a number, a {{name: score}} mapping or a JSON file, got {source!r}")
    return torch.as_tensor(per_label_thresholds(score_threshold, names), dtype=torch.float32)


class Predictor:
    """A `RetinaNet` with its eval inputs, classes, thresholds and slicing.

    Args:
        model: the ``RetinaNet`` (its device is the predictor's).
        inputs: the eval `InputSettings` (resize, padding, custom eval transforms).
        category_ids: contiguous label -> dataset category id.
        names: contiguous label -> class name.
        score_threshold: default of `__call__` and `finish` (see `read_thresholds`).
        slicing: default sliced inference (`focaldet.inference.Slicing`), None = off.
    """

    def __init__(self, model, inputs: InputSettings, category_ids: Sequence[int], names: Sequence[str],
                 score_threshold: Any = None, slicing: Slicing | Mapping[str, Any] | None = None,
                 tta: TTA | Mapping[str, Any] | None = None):
        self.model, self.inputs = model, InputSettings.from_dict(inputs)
        self.category_ids, self.names = [int(c) for c in category_ids], [str(n) for n in names]
        self.score_threshold, self.slicing = score_threshold, Slicing.of(slicing)
        self.tta = TTA.of(tta)
        if self.slicing is not None and self.tta is not None:
            raise ConfigError("slicing and test-time augmentation cannot be combined: choose one")
        self._pipeline = None
        self._thresholds: dict[Any, Tensor | None] = {}

    @property
    def device(self) -> torch.device:
        return self.model.pixel_mean.device

    @property
    def transforms(self):
        """The eval pipeline (albumentations; built once)."""
        if self._pipeline is None:
            self._pipeline = self.inputs.eval_pipeline()
        return self._pipeline

    # ------------------------------------------------------------------ prepare
    def decode(self, data: bytes, what: str, max_pixels: int):
        """An encoded image's bytes (an upload) decoded as a file of them is (reduced decoding
        included), for ``__call__``: the same detections as the file's (`_images.decode_bytes`)."""
        from focaldet.inference._images import decode_bytes

        return decode_bytes(data, what, self.transforms, max_pixels)

    def prepare(self, inputs: Any, original_size: bool = False):
        """A dataset of samples (as ``CocoDetection`` makes them) of a path, a folder, a list
        of paths and in-memory images; ``original_size``: without the eval pipeline (slicing)."""
        from focaldet.inference._images import Images, expand

        return Images(expand(inputs), None if original_size else self.transforms)

    def collate(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """A padded batch of prepared samples (``focaldet.data.transforms.collate_detection``)."""
        from focaldet.data.transforms import collate_detection

        return collate_detection(samples, self.inputs.size_divisibility)

    # ------------------------------------------------------------------ detect
    def detect_prepared(self, batch: Mapping[str, Any], outputs: dict | None = None) -> list[dict[str, Tensor]]:
        """Detections of one prepared batch in its (resized) pixels, by the batch rule: the
        images are run in groups of equal padded size, each group padded only to its own
        size. ``outputs``: the model's outputs on the whole batch, reused when the batch is
        one group of exactly its padded size (the validation loss's forward pass)."""
        model = self.model
        images = batch["images"]  # (N, 3, Hb, Wb)
        sizes = batch["image_sizes"].to(images.device)  # (N, 2)
        groups = size_groups(sizes, self.inputs.size_divisibility)
        if outputs is not None and len(groups) == 1 and groups[0][0] == tuple(images.shape[-2:]):
            return model.detect(outputs, sizes)
        found: list[dict[str, Tensor] | None] = [None] * len(images)
        for (hp, wp), idx in groups:
            index = torch.tensor(idx, device=images.device)
            part = images[:, :, :hp, :wp] if len(idx) == len(images) else images.index_select(0, index)[:, :, :hp, :wp]
            part_sizes = sizes[index]  # (n, 2)
            dets = model.detect(model(model.normalize(part, part_sizes)), part_sizes)
            for i, det in zip(idx, dets):
                found[i] = det
        return found  # type: ignore[return-value]

    @staticmethod
    def to_original(batch: Mapping[str, Any], detections: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Detections mapped from the batch's pixels back to each image's original pixels."""
        for det, size, orig in zip(detections, batch["image_sizes"].tolist(), batch["orig_sizes"].tolist()):
            det["boxes"] = rescale_boxes(det["boxes"], size, orig)
        return detections

    def detect(self, batch: Mapping[str, Any], outputs: dict | None = None) -> list[dict[str, Tensor]]:
        """`detect_prepared` then `to_original`: a prepared batch's detections in original pixels
        (moved to the model's device first)."""
        device = self.device
        moved = {**batch, "images": batch["images"].to(device), "image_sizes": batch["image_sizes"].to(device)}
        return self.to_original(batch, self.detect_prepared(moved, outputs))

    def detect_sliced(self, images: Sequence[Tensor], slicing: Slicing | None = None) -> list[dict[str, Tensor]]:
        """Detections of original-resolution ``(3, H, W)`` uint8 images by slices (each window
        prepared and run as a whole image is), merged; in original pixels."""
        post = self.model.postprocess
        return sliced_detections(images, self.detect, slicing or self.slicing, self.transforms,
                                 self.inputs.size_divisibility, post.nms_thresh, post.detections_per_img)

    def detect_tta(self, images: Sequence[Tensor], tta: TTA | None = None) -> list[dict[str, Tensor]]:
        """Detections of original-resolution ``(3, H, W)`` uint8 images over the views of ``tta``
        (flip, scales; `focaldet.inference.tta`), each view prepared and run as a whole image
        is, merged by class-wise NMS; in original pixels."""
        post = self.model.postprocess
        return tta_detections(images, self.detect, tta or self.tta, self.inputs, post.nms_thresh,
                              post.detections_per_img)

    # ------------------------------------------------------------------ finish
    def thresholds(self, score_threshold: Any = None) -> Tensor | None:
        """Per-class thresholds ``(K,)`` (`read_thresholds`; a file is read once)."""
        key = str(score_threshold) if isinstance(score_threshold, (str, os.PathLike)) else None
        if key is not None and key in self._thresholds:
            return self._thresholds[key]
        value = read_thresholds(score_threshold, self.names)
        if key is not None:
            self._thresholds[key] = value
        return value

    def finish(self, detections: list[dict[str, Tensor]], score_threshold: Any = None,
               names: bool = True) -> list[dict[str, Any]]:
        """Keep the detections scoring at least their class's threshold (``score_threshold``,
        default the predictor's), and add ``category_ids`` (and ``names``)."""
        thresholds = self.thresholds(self.score_threshold if score_threshold is None else score_threshold)
        cat_ids = torch.tensor(self.category_ids)
        out = []
        for det in detections:
            if thresholds is not None:
                keep = det["scores"] >= thresholds.to(det["scores"].device)[det["labels"]]
                det = {k: v[keep] for k, v in det.items()}
            det["category_ids"] = cat_ids.to(det["labels"].device)[det["labels"]]
            if names:
                det["names"] = [self.names[i] for i in det["labels"].tolist()]
            out.append(det)
        return out

    # ------------------------------------------------------------------ all of it
    @torch.inference_mode()
    def __call__(self, inputs: Any, score_threshold: Any = None, batch_size: int = 8,
                 slicing: Slicing | Mapping[str, Any] | None = None,
                 tta: TTA | Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """Detections per image, in input order (see ``focaldet.api.Detector.predict``)."""
        slicing = Slicing.of(slicing) or self.slicing
        tta = TTA.of(tta) or self.tta
        if slicing is not None and tta is not None:
            raise ConfigError("slicing and test-time augmentation cannot be combined: choose one")
        dataset = self.prepare(inputs, original_size=slicing is not None or tta is not None)
        results = []
        step = max(int(batch_size), 1)
        for start in range(0, len(dataset), step):
            samples = [dataset[i] for i in range(start, min(start + step, len(dataset)))]
            if slicing is not None:
                found = self.detect_sliced([s["image"] for s in samples], slicing)
            elif tta is not None:
                found = self.detect_tta([s["image"] for s in samples], tta)
            else:
                found = self.detect(self.collate(samples))
            found = [{k: v.cpu() for k, v in det.items()} for det in found]
            for det, sample in zip(self.finish(found, score_threshold), samples):
                det["file_name"] = sample["file_name"]
                results.append(det)
        return results

    def __repr__(self) -> str:
        return f"Predictor({len(self.names)} classes {self.names}, inputs={self.inputs}, device={self.device})"

