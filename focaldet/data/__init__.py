"""Data layer: COCO-format datasets, augmentation pipelines, the Lightning data module,
the synthetic shapes dataset, the data doctor and a VOC converter.

Where things live: ``images`` (decoding, headers), ``validate`` (the rules of a valid COCO
file, shared by the loader and the doctor), ``scan`` (every image decoded before use,
cached), ``coco`` (loading and datasets), ``doctor`` (``focaldet data check``), ``sampling``
(repeat-factor sampling, ``data.sampler: repeat_factor``).

Every name here is imported on first use (PEP 562), so ``focaldet data ...`` tools pay only for
what they run: never for Lightning (`CocoDataModule`), torchvision or the doctor.
"""

from importlib import import_module

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


# name -> the module of focaldet.data that defines it
_HOMES = {
    "CocoDataModule": "datamodule",
    "CocoDetection": "coco",
    "CocoValidation": "validate",
    "DataWarning": "coco",
    "ImageError": "images",
    "ImageFolderDataset": "coco",
    "ImageScan": "scan",
    "LabelMap": "coco",
    "RepeatFactorSampler": "sampling",
    "Report": "doctor",
    "ResizeShortestEdge": "transforms",
    "SyntheticCoco": "synth",
    "build_pipeline": "transforms",
    "build_transform": "transforms",
    "build_transforms": "transforms",
    "check_dataset": "doctor",
    "collate_detection": "transforms",
    "convert_voc_to_coco": "voc",
    "load_coco": "coco",
    "read_coco_json": "coco",
    "read_header": "images",
    "read_image": "images",
    "repeat_factors": "sampling",
    "scan_images": "scan",
    "validate_coco": "validate",
    "voc_to_coco": "voc",
    "write_synthetic_coco": "synth",
}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(import_module(f"focaldet.data.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
