"""``focaldet.models``: the public model entry points."""

from focaldet.modeling import AnchorGenerator, BoxCoder, Matcher, PostProcess, ResNetBackbone, RetinaNet

__all__ = ["AnchorGenerator", "BoxCoder", "Matcher", "PostProcess", "ResNetBackbone", "RetinaNet"]
