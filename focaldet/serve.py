"""``focaldet serve --ckpt_path X [--host 127.0.0.1 --port 8000]``: a `Detector` behind LitServe.

POST an image to ``/predict``, as a multipart file field ``image`` or as JSON
``{"image": "<base64 of the file>"}``; the answer is::

    {"detections": [{"category_id": 3, "name": "WBC", "bbox": [x, y, w, h], "score": 0.97}, ...]}

with COCO ``xywh`` boxes in the posted image's pixels and the dataset's category ids: the
detections ``Detector.predict`` returns for that image (same decode, same eval pipeline).
An upload that is not an image gets HTTP 400 with a one-line reason.

    curl -F image=@photo.jpg http://127.0.0.1:8000/predict
"""

from __future__ import annotations

import argparse
import base64
import binascii
import sys
from typing import Any

import cv2
import litserve as ls  # the `serve` extra
import numpy as np
from fastapi import HTTPException

from focaldet.errors import FocaldetError

__all__ = ["DetectorAPI", "decode_image", "main", "to_json"]


def decode_image(data: bytes, what: str = "the posted file") -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB from an encoded image (OpenCV, EXIF orientation applied, as
    ``focaldet.data.read_image`` decodes files)."""
    from focaldet.data.coco import ImageError

    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if image is None:
        raise ImageError(f"cannot read {what}: not a decodable image (corrupt or unsupported format)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def to_json(result: dict[str, Any], category_ids: list[int], names: list[str]) -> list[dict[str, Any]]:
    """One image's ``Detector.predict`` result as JSON detections (COCO results rounding)."""
    from focaldet.evaluation import detections_to_coco

    entries = detections_to_coco([0], [result], category_ids)
    by_id = dict(zip(category_ids, names))
    return [{"category_id": e["category_id"], "name": by_id[e["category_id"]], "bbox": e["bbox"],
             "score": e["score"]} for e in entries]


class DetectorAPI(ls.LitAPI):
    """A ``litserve.LitAPI`` around ``focaldet.load(ckpt_path)``, one image per request."""

    def __init__(self, ckpt_path: str, score_threshold: Any = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ckpt_path, self.score_threshold = ckpt_path, score_threshold

    def setup(self, device: str) -> None:
        from focaldet.api import load

        self.detector = load(self.ckpt_path, device=device)

    def decode_request(self, request):  # no annotation: LitServe passes the form or JSON body
        try:
            return _image_of(request)
        except FocaldetError as e:
            raise HTTPException(status_code=400, detail=str(e)) from None

    def predict(self, image: np.ndarray) -> dict:
        return self.detector.predict(image, score_threshold=self.score_threshold)[0]

    def encode_response(self, result: dict) -> dict:
        return {"detections": to_json(result, self.detector.category_ids, self.detector.names)}


def _image_of(request: Any) -> np.ndarray:
    """The image of a multipart upload (field ``image``) or of JSON ``{"image": base64}``."""
    field = request.get("image") if hasattr(request, "get") else None
    if field is None:
        raise FocaldetError("no image: post a multipart field 'image' or JSON {\"image\": <base64>}")
    if hasattr(field, "file"):  # an uploaded file
        return decode_image(field.file.read(), f"the posted file {getattr(field, 'filename', '') or ''}".strip())
    try:
        data = base64.b64decode(str(field), validate=True)
    except (binascii.Error, ValueError):
        raise FocaldetError("the JSON 'image' value is not base64") from None
    return decode_image(data, "the posted image")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="focaldet serve", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", required=True, help="a focaldet checkpoint")
    parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--score_threshold", default=None,
                        help="a number, or a JSON file of {name: {score: s}} per-class thresholds")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    args = parser.parse_args(argv)
    threshold: Any = args.score_threshold
    try:
        threshold = float(threshold) if threshold is not None else None
    except ValueError:
        pass  # a thresholds file
    try:
        from focaldet.api import read_checkpoint

        read_checkpoint(args.ckpt_path)  # a bad file fails here, in one line, not in a worker
        server = ls.LitServer(DetectorAPI(args.ckpt_path, threshold), accelerator=args.accelerator, devices=1,
                              timeout=args.timeout)
    except FocaldetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    server.run(host=args.host, port=args.port, generate_client_file=False, num_api_servers=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
