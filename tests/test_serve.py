"""``focaldet serve``: a LitServe server on a free local port answers what ``Detector.predict`` returns."""

from __future__ import annotations

import base64
import os
import pathlib
import signal
import socket
import subprocess
import time

import json
import urllib.error
import urllib.request

import pytest

import focaldet
from focaldet.errors import WeightsError
from focaldet.modeling import PostProcess
from focaldet.serve import main as serve_main
from focaldet.serve import to_json

from helpers import save_untrained_checkpoint
from warm import start_cli

pytestmark = pytest.mark.filterwarnings("ignore")


def save_tiny_checkpoint(path, label_map) -> None:
    """A randomly initialised tiny model, saved as Lightning saves a RetinaNetModule, keeping
    every candidate (score_thresh 0) so that there is something to compare."""
    save_untrained_checkpoint(pathlib.Path(path), label_map, {"min_size": 96, "max_size": 128},
                              postprocess=PostProcess(score_thresh=0.0, detections_per_img=10))


def _request(url: str, body: bytes | None = None, content_type: str = "") -> tuple[int, str]:
    """(status, text) of a GET (no body) or POST (standard library only)."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type} if body else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _multipart(name: str, filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = "focaldet-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_answers_what_predict_returns(tmp_path, synth_coco):
    ckpt = tmp_path / "tiny.ckpt"
    save_tiny_checkpoint(ckpt, {"cat_ids": [1, 3, 7, 8], "names": ["circle", "square", "triangle", "cross"]})
    image = sorted(synth_coco.images.glob("*.jpg"))[0]
    det = focaldet.load(ckpt, device="cpu")
    expected = to_json(det.predict(image)[0], det.category_ids, det.names)
    assert len(expected) == 10

    port = _free_port()
    proc = start_cli("serve", "--ckpt_path", str(ckpt), "--host", "127.0.0.1", "--port", str(port),
                     "--accelerator", "cpu", env={"CUDA_VISIBLE_DEVICES": ""}, new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, proc.stderr[-2000:]
            try:
                if _request(f"{url}/health")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.1)
        else:
            pytest.fail("the server did not become healthy within 120 s")
        payload = json.dumps({"image": base64.b64encode(image.read_bytes()).decode()}).encode()
        status, text = _request(f"{url}/predict", payload, "application/json")
        assert status == 200, text
        assert json.loads(text)["detections"] == expected
        bad = json.dumps({"image": base64.b64encode(b"hello").decode()}).encode()
        status, text = _request(f"{url}/predict", bad, "application/json")
        assert status == 400 and "not a decodable image" in text
        # multipart uploads (python-multipart comes with the serve and dev extras)
        status, text = _request(f"{url}/predict", *_multipart("image", image.name, image.read_bytes()))
        assert status == 200 and json.loads(text)["detections"] == expected, text
        status, text = _request(f"{url}/predict", *_multipart("image", "notes.jpg", b"hello"))
        assert status == 400 and "notes.jpg" in text and "not a decodable image" in text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_serve_refuses_a_bad_checkpoint_in_one_line(tmp_path, capsys):
    (tmp_path / "bad.ckpt").write_bytes(b"garbage")
    assert serve_main(["--ckpt_path", str(tmp_path / "bad.ckpt")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("focaldet serve: error: checkpoint ") and "bad.ckpt" in err and "\n" not in err
    with pytest.raises(WeightsError):
        focaldet.load(tmp_path / "bad.ckpt")
