from focaldet.modeling.anchors import AnchorGenerator
from focaldet.modeling.backbone import ResNetBackbone
from focaldet.modeling.box_coder import BoxCoder
from focaldet.modeling.fpn import FPN
from focaldet.modeling.head import RetinaNetHead, prior_bias
from focaldet.modeling.matcher import Matcher, Matches
from focaldet.modeling.postprocess import PostProcess
from focaldet.modeling.retinanet import RetinaNet

__all__ = [
    "FPN", "AnchorGenerator", "BoxCoder", "Matcher", "Matches", "PostProcess", "ResNetBackbone",
    "RetinaNet", "RetinaNetHead", "prior_bias",
]
