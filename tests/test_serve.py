"""python -m engine.serve: the engine behind HTTP, on an untrained run (what is checked is the
protocol: pictures and text come back, the seed repeats them, every bad request gets one
clear 4xx message and the server keeps serving)."""
from __future__ import annotations

import base64
import io
import json
import threading
import urllib.error
import urllib.request
from http.server import ThreadingHTTPServer

import pytest
from PIL import Image

from conftest_runs import make_untrained_run
from engine.serve import MAX_BODY, Service, make_handler


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs") / "tiny"
    make_untrained_run(root)
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(Service(root, "cpu")))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def call(url, path, body=None, raw: bytes | None = None, headers=None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url + path, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def png_b64(color=(200, 30, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_health(url):
    status, body = call(url, "/health")
    assert status == 200 and body["status"] == "ok" and body["device"] == "cpu"


def test_pictures_come_back_and_the_seed_repeats_them(url):
    status, body = call(url, "/v1/generate", {"prompt": "a red circle", "n": 2, "seed": 5})
    assert status == 200 and body["output"] == "image" and len(body["samples"]) == 2
    for smp in body["samples"]:
        im = Image.open(io.BytesIO(base64.b64decode(smp["image"])))
        assert im.size == (32, 32) and smp["token_ids"]
    _, again = call(url, "/v1/generate", {"prompt": "a red circle", "n": 2, "seed": 5})
    assert [s["token_ids"] for s in again["samples"]] == [s["token_ids"] for s in body["samples"]]


def test_an_image_alone_is_captioned_and_a_question_answered(url):
    status, body = call(url, "/v1/generate", {"image": png_b64(), "max_new_tokens": 8,
                                              "temperature": 0})
    assert status == 200 and body["output"] == "text"
    assert isinstance(body["samples"][0]["text"], str) and body["samples"][0]["image"] is None
    status, body = call(url, "/v1/generate", {"image": png_b64(), "prompt": "what colour?",
                                              "max_new_tokens": 4})
    assert status == 200 and body["output"] == "text"


@pytest.mark.parametrize("body, message", [
    ({"prompt": "x", "colour": "red"}, "unknown fields"),
    ({"prompt": "   "}, "non-empty"),
    ({}, "send a prompt, an image"),
    ({"prompt": "x", "n": 0}, "n must"),
    ({"prompt": "x", "top_p": 2}, "top_p"),
    ({"prompt": "x", "output": "video"}, "output must"),
    ({"image": "not base64!"}, "base64"),
    ({"prompt": "x", "cd_k": 3}, "cd_k takes"),
    ({"prompt": "a red circle " * 40}, "context"),
])
def test_bad_requests_are_400_with_the_reason(url, body, message):
    status, answer = call(url, "/v1/generate", body)
    assert status == 400 and message in answer["error"], answer


def test_bad_bodies_and_paths(url):
    assert call(url, "/v1/generate", raw=b"{not json")[0] == 400
    assert call(url, "/v1/generate", raw=b"[1, 2]")[1]["error"] == "the body must be a JSON object"
    assert call(url, "/v1/nothing", {"prompt": "x"})[0] == 404
    assert call(url, "/metrics")[0] == 404
    status, answer = call(url, "/v1/generate", raw=b"{}",
                          headers={"Content-Length": str(MAX_BODY + 1)})
    assert status == 413
    assert call(url, "/health")[0] == 200  # still serving
