"""Case ``postprocess``: decode + top-k + NMS from given head outputs."""

from __future__ import annotations

import torch

from focaldet.bench.harness import Case, Settings, log, compare
from focaldet.bench.harness import match_note
from focaldet.bench.models import head_outputs


def case_postprocess(settings: Settings) -> dict[str, float]:
    """Scores, top-k, decode, clip and NMS from given head outputs (scores mostly 0.1-0.5)."""
    from torchvision.models.detection import retinanet_resnet50_fpn

    from focaldet.models import RetinaNet

    n, s, dev = settings.loss_batch, settings.loss_size, settings.device
    torch.manual_seed(settings.seed)
    tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=settings.num_classes,
                                min_size=s, max_size=s).to(dev).eval()
    fd = RetinaNet.from_torchvision(tv)
    # logit -1.1 +- 0.5: sigmoid ~0.1-0.5, every level has >= 1000 candidates above 0.05
    logits, deltas, anchors, _, counts = head_outputs(settings, n, s, bias_mean=-1.1, seed=settings.seed + 5)
    split = {"cls_logits": list(logits.split(counts, dim=1)), "bbox_regression": list(deltas.split(counts, dim=1))}
    tv_anchors = [list(anchors.split(counts))] * n
    shapes = [(s, s)] * n
    fd_outputs = {"cls_logits": split["cls_logits"], "box_deltas": split["bbox_regression"], "anchors": anchors}
    sizes = torch.tensor(shapes, device=dev)
    above = min(int((t[0].sigmoid() > fd.postprocess.score_thresh).sum()) for t in split["cls_logits"])
    log(settings, f"postprocess: {n} images, >= {above} candidates per level above the score threshold")

    def focaldet_post():
        return fd.detect(fd_outputs, sizes)

    def torchvision_post():
        return tv.postprocess_detections(split, tv_anchors, shapes)

    with torch.no_grad():
        settings.notes["postprocess"] = match_note(focaldet_post(), torchvision_post())
    with torch.no_grad():
        return compare("postprocess", focaldet_post, torchvision_post, settings)


CASE = Case(case_postprocess, unit="s", target=3.0)
