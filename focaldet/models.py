"""``focaldet.models``: the public model entry points."""

from focaldet.modeling import AnchorGenerator, BoxCoder, Matcher, PostProcess, ResNetBackbone, RetinaNet
from focaldet.modeling.feature_backbones import TimmBackbone, TorchvisionBackbone

__all__ = ["AnchorGenerator", "BoxCoder", "Matcher", "PostProcess", "ResNetBackbone", "RetinaNet",
           "TimmBackbone", "TorchvisionBackbone"]
