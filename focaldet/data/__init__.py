"""Data layer: COCO-format datasets, augmentation pipelines, the Lightning data module,
the synthetic shapes dataset, the data doctor and a VOC converter.

Where things live: ``images`` (decoding, headers), ``validate`` (the rules of a valid COCO
file, shared by the loader and the doctor), ``scan`` (every image decoded before use,
cached), ``coco`` (loading and datasets), ``doctor`` (``focaldet data check``), ``sampling``
(repeat-factor sampling, ``data.sampler: repeat_factor``).

`CocoDataModule` is imported lazily, so ``focaldet data ...`` tools do not pay for
importing Lightning.
"""

from focaldet.data.coco import (
    CocoDetection,
    DataWarning,
    ImageFolderDataset,
    LabelMap,
    load_coco,
    read_coco_json,
)
from focaldet.data.doctor import Report, check_dataset
from focaldet.data.images import ImageError, read_header, read_image
from focaldet.data.sampling import RepeatFactorSampler, repeat_factors
from focaldet.data.scan import ImageScan, scan_images
from focaldet.data.synth import SyntheticCoco, write_synthetic_coco
from focaldet.data.transforms import (
    ResizeShortestEdge,
    build_pipeline,
    build_transform,
    build_transforms,
    collate_detection,
)
from focaldet.data.validate import CocoValidation, validate_coco
from focaldet.data.voc import convert_voc_to_coco, voc_to_coco

__all__ = [
    "CocoDataModule",
    "CocoDetection",
    "CocoValidation",
    "DataWarning",
    "ImageError",
    "ImageFolderDataset",
    "ImageScan",
    "LabelMap",
    "RepeatFactorSampler",
    "Report",
    "ResizeShortestEdge",
    "SyntheticCoco",
    "build_pipeline",
    "build_transform",
    "build_transforms",
    "check_dataset",
    "collate_detection",
    "convert_voc_to_coco",
    "load_coco",
    "read_coco_json",
    "read_header",
    "read_image",
    "repeat_factors",
    "scan_images",
    "validate_coco",
    "voc_to_coco",
    "write_synthetic_coco",
]


def __getattr__(name: str):
    if name == "CocoDataModule":
        from focaldet.data.datamodule import CocoDataModule

        return CocoDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
