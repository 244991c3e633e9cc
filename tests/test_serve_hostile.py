"""``focaldet serve`` under hostile requests: 4xx with a one-line reason for each bad body, the
server still up (and its memory flat) after them, and SIGTERM to its PID ends every process."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import struct
import time
import urllib.error
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import focaldet
from focaldet.data.images import MAX_PIXELS
from focaldet.serve import RequestGuard, body_problem, to_json

import test_serve as base
from warm import start_cli

pytestmark = pytest.mark.filterwarnings("ignore")

JSON = "application/json"


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width x height`` pixels (a decompression bomb's header), no pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _problem(body: bytes, content_type: str = JSON) -> str | None:
    return asyncio.run(body_problem(body, content_type))


def test_bad_bodies_are_named_in_one_line():
    good_form, form_type = base._multipart("image", "a.jpg", b"\xff\xd8data")
    assert _problem(b"") .startswith("empty request body")
    assert _problem(b"hello there").startswith("request body is not JSON")
    assert _problem(b"\xff\xd8\xff\xe0\x00\x10JFIF", "image/jpeg").startswith("raw binary body (10 bytes)")
    assert _problem(b"[1, 2]").startswith("JSON body must be an object")
    assert _problem(good_form[: len(good_form) // 2], form_type).startswith("broken multipart body")
    assert _problem(good_form, "multipart/form-data").startswith("broken multipart body")  # no boundary
    assert _problem(good_form, form_type) is None
    assert _problem(b'{"image": "aGk="}') is None
    for text in (_problem(b""), _problem(b"\x00\x01", "")):
        assert "\n" not in text and "multipart field 'image'" in text


def test_the_guard_answers_413_before_reading_an_oversized_body():
    sent, reached = [], []

    async def app(scope, receive, send):
        reached.append((await receive())["body"])

    async def send(message):
        sent.append(message)

    def receiver(chunks):
        it = iter(chunks)

        async def receive():
            return next(it)
        return receive

    guard = RequestGuard(app, max_bytes=100)
    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": [(b"content-length", b"1000")]}
    asyncio.run(guard(scope, receiver([]), send))
    assert sent[0]["status"] == 413 and "limit of" in json.loads(sent[1]["body"])["detail"]
    sent.clear()  # no content-length: counted while reading
    chunks = [{"type": "http.request", "body": b"x" * 60, "more_body": True}] * 3
    asyncio.run(guard({**scope, "headers": []}, receiver(chunks), send))
    assert sent[0]["status"] == 413 and not reached
    sent.clear()
    ok = [{"type": "http.request", "body": b'{"image": ', "more_body": True},
          {"type": "http.request", "body": b'"aGk="}', "more_body": False}]
    asyncio.run(guard({**scope, "headers": [(b"content-type", b"application/json")]}, receiver(ok), send))
    assert not sent and reached == [b'{"image": "aGk="}']  # handed on whole


def test_predict_refuses_what_broke_it(tmp_path):
    """Float 0..255 tensors, 0x0 arrays and decompression bombs: one-line errors, not a
    binary image, a ZeroDivisionError or a raw PIL error."""
    import torch

    from focaldet.errors import DataError

    ckpt = tmp_path / "tiny.ckpt"
    base.save_tiny_checkpoint(ckpt, {"cat_ids": [1, 2], "names": ["a", "b"]})
    det = focaldet.load(ckpt, device="cpu")
    with pytest.raises(DataError, match=r"input 0: a float tensor image must be in \[0, 1\], got values in \[0, 255\]"):
        det.predict(torch.linspace(0, 255, 3 * 64 * 64).reshape(3, 64, 64))
    assert len(det.predict(torch.rand(3, 64, 64))) == 1
    with pytest.raises(DataError, match=r"input 0 is empty \(0x0 pixels\)"):
        det.predict(np.zeros((0, 0, 3), np.uint8))
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(20_000, 20_000))
    with pytest.raises(DataError, match=rf"cannot read image {bomb} \(image id 0\): 400 Mpx, over the limit of 100 Mpx"):
        det.predict(bomb)
    assert MAX_PIXELS == 100_000_000


def _rss_kb(pgid: int) -> int:
    """Resident memory of every process in the group (KiB, from /proc)."""
    total = 0
    for pid in _group(pgid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def _group(pgid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z" and int(fields[2]) == pgid:  # state, ppid, pgrp
                found.append(int(entry))
    return found


@pytest.mark.slow
def test_hostile_requests_then_sigterm(tmp_path, synth_coco):
    ckpt = tmp_path / "tiny.ckpt"
    base.save_tiny_checkpoint(ckpt, {"cat_ids": [1, 3, 7, 8], "names": ["circle", "square", "triangle", "cross"]})
    image = sorted(synth_coco.images.glob("*.jpg"))[0]
    data = image.read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    det = focaldet.load(ckpt, device="cpu")
    expected_good = to_json(det.predict(image)[0], det.category_ids, det.names)
    expected_truncated = to_json(det.predict(truncated)[0], det.category_ids, det.names)

    port = base._free_port()
    proc = start_cli("serve", "--ckpt_path", str(ckpt), "--port", str(port), "--accelerator", "cpu",
                     "--max_upload_mb", "1", "--max_pixels", "4000000", env={"CUDA_VISIBLE_DEVICES": ""},
                     new_session=True)
    url = f"http://127.0.0.1:{port}"
    b64 = lambda raw: json.dumps({"image": base64.b64encode(raw).decode()}).encode()  # noqa: E731
    form, form_type = base._multipart("image", image.name, data)
    bad = [  # (body, content type, status)
        (b"", JSON, 400), (b"", "", 400), (b"not json at all", JSON, 400), (data, "image/jpeg", 400),
        (data, JSON, 400), (form[: len(form) // 2], form_type, 400), (form, "multipart/form-data", 400),
        (b"[1, 2, 3]", JSON, 400), (b'{"x": 1}', JSON, 400), (b'{"image": "%%%"}', JSON, 400),
        (b64(b"hello"), JSON, 400), (b64(png_header(3000, 3000)), JSON, 400),
        (b"x" * (2 << 20), JSON, 413), (os.urandom(4096), "application/octet-stream", 400),
    ]
    good = [(b64(data), JSON, 200), (b64(truncated.read_bytes()), JSON, 200)]
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            assert proc.poll() is None, proc.stderr[-2000:]
            try:
                if base._request(f"{url}/health")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.1)
        else:
            pytest.fail("the server did not become healthy within 180 s")

        def send(case):
            body, ctype, want = case
            try:
                status, text = base._request(f"{url}/predict", body, ctype) if body else \
                    _post_empty(f"{url}/predict", ctype)
            except (urllib.error.URLError, ConnectionError) as e:  # 413 may close before the body is sent
                status, text = (413, str(e)) if want == 413 else (-1, str(e))
            return case, status, text

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(send, bad + good))  # warm-up round
            rss_before = _rss_kb(proc.pid)
            results = list(pool.map(send, (bad + good) * 3 + bad[:2]))  # 50 mixed requests
        rss_after = _rss_kb(proc.pid)
        assert len(results) == 50
        for (body, ctype, want), status, text in results:
            assert status == want, (ctype, body[:40], status, text[:300])
            if want == 400:
                assert "\n" not in json.loads(text)["detail"]
        answers = {status: text for (body, _, _), status, text in results if status == 200 and body == b64(data)}
        assert json.loads(answers[200])["detections"] == expected_good
        trunc = [t for (body, _, _), s, t in results if body == b64(truncated.read_bytes())]
        assert json.loads(trunc[0])["detections"] == expected_truncated  # predicted, as Detector.predict does
        assert rss_after - rss_before < 150_000, (rss_before, rss_after)  # KiB: flat, not growing per request
        status, text = base._request(f"{url}/predict", b64(data), JSON)  # still serving
        assert status == 200 and json.loads(text)["detections"] == expected_good
        assert len(_group(proc.pid)) > 1  # the server runs workers ...
        os.kill(proc.pid, signal.SIGTERM)  # ... and SIGTERM to its PID alone ends them all
        proc.wait(timeout=60)
        deadline = time.time() + 20
        while _group(proc.pid) and time.time() < deadline:
            time.sleep(0.2)
        assert _group(proc.pid) == [], "processes of the server left after SIGTERM"
    finally:
        if proc.poll() is None or _group(proc.pid):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def _post_empty(url: str, content_type: str) -> tuple[int, str]:
    import urllib.request

    req = urllib.request.Request(url, data=b"", method="POST", headers={"Content-Type": content_type} if content_type
                                 else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
