"""engine.serve's OpenAI-compatible routes, driven by OpenAI's own Python client: the models
list, text -> image through the Images API, captions and questions through chat completions
with data: URL pictures, and errors as OpenAI's client raises them (on an untrained run: what
is checked is the protocol)."""
from __future__ import annotations

import base64
import io
import queue
import threading
from concurrent.futures import Future
from http.server import ThreadingHTTPServer
from types import SimpleNamespace

import openai
import pytest
from PIL import Image

from conftest_runs import make_untrained_run
from engine.serve import Service, make_handler

TOKENS_PER_IMAGE = 64   # the untrained run's 32-pixel pictures, 4x downsampled


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs") / "tiny"
    make_untrained_run(root)
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(Service(root, "cpu")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1",
                        api_key="unused", max_retries=0, timeout=120)
    server.shutdown()
    server.server_close()


def data_url(color=(200, 30, 30), fmt="PNG") -> str:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def picture(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_the_run_is_the_one_model(client):
    [model] = client.models.list().data
    assert model.id == "tiny" and model.owned_by == "cm3leon-engine"


def test_images_come_back_as_b64_and_the_seed_repeats_them(client):
    answer = client.images.generate(model="tiny", prompt="a red circle", n=2, size="32x32",
                                    response_format="b64_json", extra_body={"seed": 3})
    assert len(answer.data) == 2 and answer.size == "32x32" and answer.output_format == "png"
    images = [picture(d.b64_json) for d in answer.data]
    assert all(im.format == "PNG" and im.size == (32, 32) for im in images)
    again = client.images.generate(prompt="a red circle", n=2, extra_body={"seed": 3})
    assert [d.b64_json for d in again.data] == [d.b64_json for d in answer.data]


def test_jpeg_output_with_the_engines_own_sampling_fields(client):
    answer = client.images.generate(prompt="a blue square", extra_body={
        "output_format": "jpeg", "output_compression": 80, "cfg_scale": 2.0, "top_k": 8})
    assert picture(answer.data[0].b64_json).format == "JPEG"


def test_chat_answers_a_question_about_a_picture(client):
    answer = client.chat.completions.create(model="tiny", n=2, max_tokens=5, messages=[
        {"role": "system", "content": "ignored: the model has no chat template"},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url()}},
            {"type": "text", "text": "what colour is the shape?"}]}])
    assert answer.object == "chat.completion" and answer.model == "tiny"
    assert len(answer.choices) == 2
    for choice in answer.choices:
        assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
        assert choice.finish_reason in ("stop", "length")
    assert 0 < answer.usage.completion_tokens <= 10
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert answer.usage.prompt_tokens > TOKENS_PER_IMAGE, "the picture is in the prompt"
    # a picture alone is captioned; a plain string content is a text prompt
    caption = client.chat.completions.create(model="tiny", max_completion_tokens=4, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(fmt="JPEG")}}]}])
    assert isinstance(caption.choices[0].message.content, str)
    assert caption.usage.prompt_tokens > TOKENS_PER_IMAGE
    # only the last user message is the prompt: the earlier turn's picture is not in it
    text = client.chat.completions.create(model="tiny", max_tokens=4, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url()}}]},
        {"role": "assistant", "content": "a red circle"},
        {"role": "user", "content": "a <mask> circle"}])
    assert text.choices[0].finish_reason in ("stop", "length")
    assert text.usage.prompt_tokens < 16


def test_chat_streams_the_answer_as_it_comes(client):
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url()}},
        {"type": "text", "text": "what colour is the shape?"}]}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6,
                                           seed=5, n=2)
    chunks = list(client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=6, seed=5, n=2, stream=True,
        stream_options={"include_usage": True}))
    for i, choice in enumerate(whole.choices):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert mine[0].delta.role == "assistant"
        assert "".join(m.delta.content or "" for m in mine).strip() == choice.message.content
        assert [m.finish_reason for m in mine if m.finish_reason] == [choice.finish_reason]
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_stream_deltas_follow_the_text_and_wait_for_whole_characters():
    # (the untrained model above draws stray bytes, so its text arrives in one piece)
    from engine.serve_openai import _chunks
    text_of = {(1,): " a", (1, 2): " a b", (1, 2, 3): " a b\ufffd", (1, 2, 3, 4): " a b é"}
    engine = SimpleNamespace(text_so_far=lambda ids: text_of[tuple(ids)])
    events = queue.Queue()
    for token in (1, 2, 3, 4, None):
        events.put(None if token is None else (0, token))
    done = Future()
    done.set_result(SimpleNamespace(prompt_ids=[7, 7], samples=[
        SimpleNamespace(text=" a b é", finish_reason="eos", token_ids=[1, 2, 3, 4])]))
    chunks = list(_chunks(SimpleNamespace(engine=engine, model_name="m"), done, events, True))
    assert [c["choices"][0]["delta"] for c in chunks[:-1]] == [
        {"role": "assistant", "content": "a"}, {"content": " b"}, {"content": " é"}, {}]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 6


@pytest.mark.parametrize("call, error, message", [
    (lambda c: c.images.generate(model="dall-e-3", prompt="x"), openai.NotFoundError, "does not exist"),
    (lambda c: c.images.generate(prompt="x", size="1024x1024"), openai.BadRequestError, "32x32"),
    (lambda c: c.images.generate(prompt="x", response_format="url"), openai.BadRequestError, "b64_json"),
    (lambda c: c.images.generate(prompt=" "), openai.BadRequestError, "non-empty"),
    (lambda c: c.images.generate(prompt="x", n=0), openai.BadRequestError, "n must"),
    (lambda c: c.images.generate(prompt="x", extra_body={"frames": 3}), openai.BadRequestError,
     "unsupported fields ['frames']"),
    (lambda c: c.chat.completions.create(model="tiny", messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]),
     openai.BadRequestError, "does not fetch"),
    (lambda c: c.chat.completions.create(model="tiny", stream=True, messages=[
        {"role": "user", "content": "a <mask> circle"}]), openai.BadRequestError, "infilling"),
    (lambda c: c.chat.completions.create(model="tiny", stream=True, max_tokens=10**6, messages=[
        {"role": "user", "content": "hi"}]), openai.BadRequestError, "max_new_tokens"),
    (lambda c: c.chat.completions.create(model="tiny", messages=[
        {"role": "assistant", "content": "hi"}]), openai.BadRequestError, "no user message"),
    (lambda c: c.chat.completions.create(model="tiny", temperature=-1, messages=[
        {"role": "user", "content": "hi"}]), openai.BadRequestError, "temperature"),
])
def test_errors_in_openais_shape(client, call, error, message):
    with pytest.raises(error) as raised:
        call(client)
    assert message in raised.value.message
    assert raised.value.body["type"] == "invalid_request_error"
