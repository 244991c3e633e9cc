from focaldet.structures.boxes import clip_boxes, rescale_boxes, xywh_to_xyxy, xyxy_to_xywh

__all__ = ["clip_boxes", "rescale_boxes", "xywh_to_xyxy", "xyxy_to_xywh"]
