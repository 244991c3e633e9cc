"""``focaldet serve --ckpt_path X [--host 127.0.0.1 --port 8000]``: a `Detector` behind LitServe.

POST an image to ``/predict``, as a multipart file field ``image`` or as JSON
``{"image": "<base64 of the file>"}``; the answer is::

    {"detections": [{"category_id": 3, "name": "WBC", "bbox": [x, y, w, h], "score": 0.97}, ...]}

with COCO ``xywh`` boxes in the posted image's pixels and the dataset's category ids: the
detections ``Detector.predict`` returns for that image (same decode, same eval pipeline).
An upload that is not an image gets HTTP 400 with a one-line reason, as do an empty body,
a body that is neither JSON nor a multipart form (raw image bytes, say), a broken multipart
form and an image over ``--max_pixels`` (`focaldet.data.images.MAX_PIXELS`, the limit
``Detector.predict`` applies); a body over ``--max_upload_mb`` gets 413 before it is read
whole. Uploads are decoded by focaldet's own decoder (`focaldet.data.images`), so the server
predicts exactly what ``Detector.predict`` predicts for the same file. SIGTERM or SIGINT to
the ``serve`` process stops it and every process it started.

    curl -F image=@photo.jpg http://127.0.0.1:8000/predict
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import litserve as ls  # the `serve` extra
from fastapi import HTTPException

from focaldet.data.images import MAX_PIXELS
from focaldet.errors import FocaldetError
from focaldet.failures import report_errors

__all__ = ["DetectorAPI", "main", "to_json"]


MAX_UPLOAD_MB = 32.0  # default --max_upload_mb
_HOW = "post a multipart field 'image' or JSON {\"image\": <base64 of the file>}"


async def body_problem(body: bytes, content_type: str) -> str | None:
    """Why a ``/predict`` body cannot be a request (one line), or ``None``."""
    if not body:
        return f"empty request body: {_HOW}"
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
        from starlette.requests import Request

        async def receive() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        scope = {"type": "http", "method": "POST", "headers": [(b"content-type", content_type.encode("latin-1"))]}
        try:
            form = await Request(scope, receive).form()
        except Exception as e:  # MultiPartException, a missing boundary, ...
            return f"broken multipart body ({' '.join(str(e).split())[:120] or type(e).__name__}): {_HOW}"
        await form.close()
        boundary = next((p.split("=", 1)[1].strip().strip('"') for p in content_type.split(";")[1:]
                         if p.strip().lower().startswith("boundary=")), None)
        if kind == "multipart/form-data" and (not boundary or not body.rstrip().endswith(f"--{boundary}--".encode())):
            return f"broken multipart body (truncated: no closing boundary): {_HOW}"
        return None
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        printable = body[:64].decode("utf-8", "replace")
        if "\ufffd" in printable or any(ord(c) < 9 for c in printable):
            return f"raw binary body ({len(body)} bytes): {_HOW}"
        return f"request body is not JSON: {_HOW}"
    if not isinstance(value, dict):
        return f"JSON body must be an object: {_HOW}"
    return None


class RequestGuard:
    """ASGI middleware in front of ``/predict``: a body over ``max_bytes`` gets 413 (read no
    further), an empty / non-JSON / raw binary / broken multipart body 400 with a one-line
    reason (`body_problem`); the body is then handed on to LitServe as it came."""

    def __init__(self, app, max_bytes: int, path: str = "/predict") -> None:
        self.app, self.max_bytes, self.path = app, int(max_bytes), path

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") != self.path:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        too_big = f"upload over the limit of {self.max_bytes / 2**20:g} MB (--max_upload_mb)"
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            return await _reject(send, 413, too_big)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await _reject(send, 413, too_big)
            if not message.get("more_body"):
                break
        problem = await body_problem(bytes(body), headers.get("content-type", ""))
        if problem:
            return await _reject(send, 400, problem)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _reject(send, status: int, detail: str) -> None:
    payload = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def to_json(result: dict[str, Any], category_ids: list[int], names: list[str]) -> list[dict[str, Any]]:
    """One image's ``Detector.predict`` result as JSON detections (COCO results rounding)."""
    from focaldet.evaluation import detections_to_coco

    entries = detections_to_coco([0], [result], category_ids)
    by_id = dict(zip(category_ids, names))
    return [{"category_id": e["category_id"], "name": by_id[e["category_id"]], "bbox": e["bbox"],
             "score": e["score"]} for e in entries]


class DetectorAPI(ls.LitAPI):
    """A ``litserve.LitAPI`` around ``focaldet.load(ckpt_path)``, one image per request."""

    def __init__(self, ckpt_path: str, score_threshold: Any = None, trust_code: bool = False,
                 max_pixels: int = MAX_PIXELS, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ckpt_path, self.score_threshold, self.trust_code = ckpt_path, score_threshold, trust_code
        self.max_pixels = max_pixels

    def setup(self, device: str) -> None:
        from focaldet.api import load

        self.detector = load(self.ckpt_path, device=device, trust_code=self.trust_code)

    def decode_request(self, request):  # no annotation: LitServe passes the form or JSON body
        try:
            # decoded as `predict` decodes the same file (at 1/2..1/8 when the eval resize allows)
            return _image_of(request, lambda data, what: self.detector.predictor.decode(data, what, self.max_pixels))
        except FocaldetError as e:
            raise HTTPException(status_code=400, detail=str(e)) from None

    def predict(self, image: Any) -> dict:
        return self.detector.predict(image, score_threshold=self.score_threshold)[0]

    def encode_response(self, result: dict) -> dict:
        return {"detections": to_json(result, self.detector.category_ids, self.detector.names)}


def _image_of(request: Any, decode: Callable[[bytes, str], Any]) -> Any:
    """The image of a multipart upload (field ``image``) or of JSON ``{"image": base64}``,
    decoded by ``decode(bytes, what)``."""
    field = request.get("image") if hasattr(request, "get") else None
    if field is None:
        raise FocaldetError("no image: post a multipart field 'image' or JSON {\"image\": <base64>}")
    if hasattr(field, "file"):  # an uploaded file
        return decode(field.file.read(), f"the posted file {getattr(field, 'filename', '') or ''}".strip())
    try:
        data = base64.b64decode(str(field), validate=True)
    except (binascii.Error, ValueError):
        raise FocaldetError("the JSON 'image' value is not base64") from None
    return decode(data, "the posted image")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="focaldet serve", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", required=True, help="a focaldet checkpoint")
    parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--score_threshold", default=None,
                        help="a number, or a JSON file of {name: {score: s}} per-class thresholds")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    parser.add_argument("--max_upload_mb", type=float, default=MAX_UPLOAD_MB,
                        help=f"largest request body in MB (2^20 bytes); larger gets HTTP 413 (default {MAX_UPLOAD_MB:g})")
    parser.add_argument("--max_pixels", type=int, default=MAX_PIXELS,
                        help=f"largest image (h x w) decoded; larger gets HTTP 400 (default {MAX_PIXELS:,}, "
                             "as Detector.predict)")
    parser.add_argument("--trust_checkpoint_code", action="store_true",
                        help="build classes outside focaldet's allow-list that the checkpoint names "
                             "(a file you made: see docs/security.md)")
    args = parser.parse_args(argv)
    return report_errors(_serve, args, prog="focaldet serve")


def _serve(args: argparse.Namespace) -> int:
    threshold: Any = args.score_threshold
    try:
        threshold = float(threshold) if threshold is not None else None
    except ValueError:
        pass  # a thresholds file
    from focaldet.api import check_recipe, read_checkpoint

    # a bad or hostile file fails here, in one line, not in a worker
    check_recipe(read_checkpoint(args.ckpt_path), args.trust_checkpoint_code)
    if args.max_upload_mb <= 0 or args.max_pixels <= 0:
        raise FocaldetError("--max_upload_mb and --max_pixels must be > 0")
    server = ls.LitServer(DetectorAPI(args.ckpt_path, threshold, args.trust_checkpoint_code, args.max_pixels),
                          accelerator=args.accelerator, devices=1, timeout=args.timeout,
                          middlewares=[(RequestGuard, {"max_bytes": int(args.max_upload_mb * 2**20)})])
    _stop_on_signals()
    try:
        server.run(host=args.host, port=args.port, generate_client_file=False, num_api_servers=1)
    except KeyboardInterrupt:
        pass
    finally:
        _end_children()
    return 0


def _stop_on_signals() -> None:
    """SIGTERM and SIGINT to this process: LitServe's graceful shutdown (it handles
    KeyboardInterrupt), which stops its workers. (Python's default SIGTERM ends this process
    alone, and its uvicorn and inference workers keep serving.) A forked child that inherits
    the handler dies of the signal as usual."""
    owner = os.getpid()

    def stop(signum, frame):
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)


def _end_children(grace_s: float = 5.0) -> None:
    """Every process this one started and LitServe left running: terminated, then killed."""
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(grace_s)
        if child.is_alive():
            child.kill()
            child.join()


if __name__ == "__main__":
    sys.exit(main())
