"""Export a focaldet RetinaNet with its pre- and post-processing in the graph.

``graph.py``: the exportable module (fixed-shape outputs); ``core.py``: ONNX and
``torch.export`` files with metadata; ``runtime.py``: run an exported file;
``evaluate.py``: its COCO mAP; ``cli.py``: ``focaldet export``.
"""

from focaldet.export.core import FORMATS, ExportError, export, export_onnx, export_torch, load_torch_export, metadata
from focaldet.export.graph import ExportableDetector
from focaldet.export.runtime import ExportedDetector

__all__ = ["FORMATS", "ExportError", "ExportableDetector", "ExportedDetector", "export", "export_onnx",
           "export_torch", "load_torch_export", "metadata"]
