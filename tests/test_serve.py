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
    ({"image": base64.b64encode(b"not an image").decode()}, "not an image file"),
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


class FakeEngine:
    """Records each generate call; the first one waits until the test lets it finish, so the
    requests submitted meanwhile are all waiting when the worker comes back."""

    def __init__(self, fail=False):
        self.calls, self.objects, self.fail = [], [], fail
        self.inside, self.release = threading.Event(), threading.Event()

    def generate(self, prompts, params, on_token=None):
        assert len(params) == len(prompts), "one SamplingParams per request"
        self.calls.append(([p[0] for p in prompts], [(sp.seed, sp.n, sp.modality) for sp in params]))
        self.objects.append(params)
        if len(self.calls) == 1:
            self.inside.set()
            self.release.wait(10)
        if on_token is not None and self.fail == "while streaming":
            for i in range(len(prompts)):
                on_token(i, 0, 42)   # every prompt's first token goes out, then it fails
        if self.fail and any(p[0] == "bad" for p in prompts):
            raise ValueError("the model refused")
        return [f"result of {p[0]}" for p in prompts]


def _params(**kw):
    from engine.inference import SamplingParams
    return SamplingParams(**kw)


def test_waiting_unseeded_requests_share_a_call_whatever_their_settings():
    from engine.serve import Batcher
    engine = FakeEngine()
    batcher = Batcher(engine, max_batch=32)
    first = batcher.submit(["a"], _params(), seeded=False)
    assert engine.inside.wait(10)
    b = batcher.submit(["b"], _params(), seeded=False)
    c = batcher.submit(["c"], _params(modality="text", cfg_scale=1.0), seeded=False)
    d = batcher.submit(["d"], _params(seed=7), seeded=True)
    e = batcher.submit(["e"], _params(n=2, top_p=0.5), seeded=False)
    f = batcher.submit(["f"], _params(), seeded=False)
    engine.release.set()
    assert [x.result(10) for x in (first, b, c, d, e, f)] == [f"result of {x}" for x in "abcdef"]
    assert [p for p, _ in engine.calls] == [["a"], ["b", "c", "e", "f"], ["d"]]
    shared = engine.calls[1][1]
    assert [(n, modality) for _, n, modality in shared] == [(1, "image"), (1, "text"), (2, "image"),
                                                            (1, "image")]
    assert len({seed for seed, _, _ in shared[:3]}) == 3, "other settings, other seeds"
    together = engine.objects[1]
    assert together[3] is together[0], "the same settings sample together, as one SamplingParams"
    assert engine.calls[2][1] == [(7, 1, "image")], "a seeded request keeps its seed"


def test_a_request_that_cannot_run_fails_alone():
    # it waits in a batch with a good one: the failed call is rerun one request at a time
    from engine.serve import Batcher
    engine = FakeEngine(fail=True)
    batcher = Batcher(engine, max_batch=32)
    first = batcher.submit(["a"], _params(), seeded=False)
    assert engine.inside.wait(10)
    bad = batcher.submit(["bad"], _params(), seeded=False)
    good = batcher.submit(["b"], _params(), seeded=False)
    engine.release.set()
    assert first.result(10) == "result of a" and good.result(10) == "result of b"
    with pytest.raises(ValueError, match="refused"):
        bad.result(10)
    assert [p for p, _ in engine.calls] == [["a"], ["bad", "b"], ["bad"], ["b"]]


def test_tokens_reach_their_stream_and_a_begun_stream_is_not_rerun():
    from engine.serve import Batcher
    engine = FakeEngine(fail="while streaming")
    batcher = Batcher(engine, max_batch=32)
    first = batcher.submit(["a"], _params(), seeded=False)
    assert engine.inside.wait(10)
    heard = []
    bad = batcher.submit(["bad"], _params(), seeded=False)
    streamed = batcher.submit(["s"], _params(), seeded=False,
                              on_token=lambda sample, token: heard.append((sample, token)))
    quiet = batcher.submit(["q"], _params(), seeded=False)
    engine.release.set()
    assert first.result(10) == "result of a" and quiet.result(10) == "result of q"
    assert heard == [(0, 42)], "its own token only, once"
    with pytest.raises(ValueError, match="refused"):
        streamed.result(10)  # its stream had begun: a rerun would send its tokens twice
    with pytest.raises(ValueError, match="refused"):
        bad.result(10)
    assert [p for p, _ in engine.calls] == [["a"], ["bad", "s", "q"], ["bad"], ["q"]]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_serving_from_a_gpu(tmp_path, dtype):
    root = tmp_path / "tiny"
    make_untrained_run(root)
    service = Service(root, "cuda", dtype)
    assert service.info["device"].startswith("cuda")
    body = service.generate({"prompt": "a red circle", "n": 3})
    assert body["output"] == "image" and all(s["image"] for s in body["samples"])
    body = service.generate({"image": png_b64(), "max_new_tokens": 6, "seed": 1})
    assert body["output"] == "text" and body["samples"][0]["token_ids"]
