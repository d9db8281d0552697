"""OpenAI-compatible routes of engine.serve, so that clients written for OpenAI's API (its
SDKs, chat and image front-ends) can use a run by pointing their base URL at the server:

  GET  /v1/models               the served run, as the one model (its name: --served-model-name,
                                by default the run directory's)
  POST /v1/images/generations   text -> image (the Images API): prompt, model, n, size
                                ("WxH" of the run's pictures, or "auto"), response_format
                                "b64_json", output_format png / jpeg / webp, output_compression
  POST /v1/chat/completions     text out, for captions, questions and instructions: the last
                                user message, its text and its pictures (image_url parts as
                                data: URLs), is the prompt; model, n, seed, temperature, top_p,
                                max_tokens / max_completion_tokens, stream (server-sent
                                chat.completion.chunk events as the tokens come, then [DONE];
                                stream_options.include_usage)

The model has no chat template: it answers the last user message alone, so earlier turns and
system messages are not seen. Both POST routes also take the engine's own sampling fields as
extensions (seed, cfg_scale, image_cfg_scale, cd_k, temperature, top_p, top_k), as vLLM takes
its extra sampling parameters. OpenAI options that mean nothing here (quality, style, user,
moderation, metadata, ...) are accepted and left unused; ones that would change the answer and
that the engine cannot honour (URL responses, remote image URLs, tools, penalties, streamed
pictures or infilling) are a 400 that says so. Errors have OpenAI's shape: {"error": {"message", "type", "param",
"code"}}.
"""
from __future__ import annotations

import queue
import time
import uuid
from typing import Iterator

from engine.serve import BadRequest, _base64, _image

ENGINE_SAMPLING = {"seed", "cfg_scale", "image_cfg_scale", "cd_k", "temperature", "top_p", "top_k"}
IMAGE_FIELDS = {"prompt", "model", "n", "size", "response_format", "output_format",
                "output_compression", "background", "stream"}
IMAGE_UNUSED = {"quality", "style", "user", "moderation", "safety_identifier"}
CHAT_FIELDS = {"messages", "model", "n", "max_tokens", "max_completion_tokens", "stream",
               "stream_options", "frequency_penalty", "presence_penalty", "tools", "tool_choice",
               "logprobs", "response_format", "modalities"}
CHAT_UNUSED = {"user", "store", "metadata", "service_tier", "safety_identifier",
               "prompt_cache_key", "parallel_tool_calls", "top_logprobs", "reasoning_effort",
               "verbosity"}
FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
FINISH = {"eos": "stop", "length": "length", "image": "stop"}


class ModelNotFound(LookupError):
    """A request named another model than the one served: a 404, as OpenAI answers."""


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def models(service) -> dict:
    return {"object": "list", "data": [{"id": service.model_name, "object": "model",
                                        "created": service.created, "owned_by": "cm3leon-engine"}]}


def _check_fields(body: dict, known: set, unused: set) -> None:
    unknown = set(body) - known - unused - ENGINE_SAMPLING
    if unknown:
        raise BadRequest(f"unsupported fields {sorted(unknown)}; this server takes "
                         f"{sorted(known | ENGINE_SAMPLING)}")


def _check_model(service, body: dict) -> None:
    model = body.get("model")
    if model is not None and model != service.model_name:
        raise ModelNotFound(f"the model {model!r} does not exist: this server serves "
                            f"{service.model_name!r} (GET /v1/models)")


def _engine_fields(body: dict) -> dict:
    return {k: body[k] for k in ENGINE_SAMPLING if body.get(k) is not None}


def images_generations(service, body: dict) -> dict:
    _check_fields(body, IMAGE_FIELDS, IMAGE_UNUSED)
    _check_model(service, body)
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRequest("prompt must be a non-empty string")
    side = service.engine.image_size
    size = f"{side}x{side}"
    if body.get("size") not in (None, "auto", size):
        raise BadRequest(f"size {body['size']!r} is not drawn by this model: its pictures are "
                         f"{size} (or pass \"auto\")")
    if body.get("response_format") not in (None, "b64_json"):
        raise BadRequest("response_format must be \"b64_json\": this server keeps no files to "
                         "link to")
    fmt = body.get("output_format") or "png"
    if fmt not in FORMATS:
        raise BadRequest(f"output_format must be one of {sorted(FORMATS)}; got {fmt!r}")
    quality = body.get("output_compression")
    if quality is not None and not (isinstance(quality, int) and 0 <= quality <= 100):
        raise BadRequest("output_compression must be an integer from 0 to 100")
    if body.get("background") not in (None, "auto", "opaque"):
        raise BadRequest("background must be \"auto\" or \"opaque\": the pictures have no alpha")
    if body.get("stream"):
        raise BadRequest("stream is not supported: the pictures come back whole")
    fields = {**_engine_fields(body), "n": body.get("n")}
    result = service.run([prompt], "image", fields)
    return {"created": int(time.time()), "output_format": fmt, "size": size,
            "data": [{"b64_json": _base64(smp.images[0], FORMATS[fmt], quality)}
                     for smp in result.samples]}


def chat_completions(service, body: dict) -> dict | Iterator[dict]:
    """The answer, or with stream=true an iterator of its chunks (the caller sends each as a
    server-sent event, then [DONE]); a bad request raises before the first chunk."""
    _check_fields(body, CHAT_FIELDS, CHAT_UNUSED)
    _check_model(service, body)
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name):
            raise BadRequest(f"{name} is not supported (leave it out or 0)")
    if body.get("tools") or body.get("tool_choice") not in (None, "none"):
        raise BadRequest("tools are not supported by this model")
    if body.get("logprobs"):
        raise BadRequest("logprobs are not returned here; POST /v1/generate gives token ids")
    if body.get("response_format") not in (None, {"type": "text"}):
        raise BadRequest("response_format must be {\"type\": \"text\"}")
    if body.get("modalities") not in (None, ["text"]):
        raise BadRequest("modalities must be [\"text\"]; draw pictures with "
                         "POST /v1/images/generations")
    items = _last_user_message(body.get("messages"))
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    fields = {**_engine_fields(body), "n": body.get("n"), "max_new_tokens": limit}
    if body.get("stream"):
        if any(isinstance(x, str) and "<mask>" in x for x in items):
            raise BadRequest("infilling (<mask>) answers come whole: send stream=false")
        usage = (body.get("stream_options") or {}).get("include_usage", False)
        return _stream_chunks(service, items, fields, usage)
    result = service.run(items, "text", fields)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
        "created": int(time.time()), "model": service.model_name,
        "choices": [{"index": i, "message": {"role": "assistant", "content": smp.text.strip()},
                     "finish_reason": FINISH.get(smp.finish_reason, "stop"), "logprobs": None}
                    for i, smp in enumerate(result.samples)],
        "usage": _usage(result)}


def _usage(result) -> dict:
    completion = sum(len(smp.token_ids) for smp in result.samples)
    return {"prompt_tokens": len(result.prompt_ids), "completion_tokens": completion,
            "total_tokens": len(result.prompt_ids) + completion}


def _stream_chunks(service, items: list, fields: dict, include_usage: bool) -> Iterator[dict]:
    """Queues the request with a token listener and returns the chunks' iterator; the
    request runs in the batching worker (with whatever else waits), its tokens arrive here."""
    events: queue.Queue = queue.Queue()
    future = service.submit(items, "text", fields,
                            on_token=lambda sample, token: events.put((sample, token)))
    future.add_done_callback(lambda _: events.put(None))
    return _chunks(service, future, events, include_usage)


def _chunks(service, future, events: queue.Queue, include_usage: bool) -> Iterator[dict]:
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(index, delta, finish=None) -> dict:
        if index not in opened:  # a choice's first chunk says who speaks
            opened.add(index)
            delta = {"role": "assistant", **delta}
        return {"id": ident, "object": "chat.completion.chunk", "created": created,
                "model": service.model_name, "choices": [
                    {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    opened: set[int] = set()
    ids: dict[int, list[int]] = {}
    sent: dict[int, str] = {}
    while (event := events.get()) is not None:
        sample, token = event
        ids.setdefault(sample, []).append(token)
        text = service.engine.text_so_far(ids[sample]).lstrip()
        said = sent.get(sample, "")
        # half a UTF-8 character decodes as U+FFFD until its other bytes come
        if text.endswith("\ufffd") or not text.startswith(said) or text == said:
            continue
        sent[sample] = text
        yield chunk(sample, {"content": text[len(said):]})
    result = future.result()  # the request's own error, raised here
    for index, smp in enumerate(result.samples):
        final, said = smp.text.strip(), sent.get(index, "")
        rest = final[len(said):] if final.startswith(said) else ""
        yield chunk(index, {"content": rest} if rest else {},
                    FINISH.get(smp.finish_reason, "stop"))
    if include_usage:
        yield {"id": ident, "object": "chat.completion.chunk", "created": created,
               "model": service.model_name, "choices": [], "usage": _usage(result)}


def _last_user_message(messages) -> list:
    """The prompt: the last user message's parts in order, text as text, pictures decoded."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise BadRequest("messages hold no user message to answer")
    content = users[-1].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise BadRequest("a message's content must be a string or a list of parts")
    items = []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if part["text"].strip():
                items.append(part["text"])
        elif kind == "image_url":
            items.append(_data_url_image((part.get("image_url") or {}).get("url")))
        else:
            raise BadRequest(f"content parts must be text or image_url; got {part!r:.80}")
    if not items:
        raise BadRequest("the last user message is empty")
    return items


def _data_url_image(url):
    if not isinstance(url, str) or not url.startswith("data:"):
        raise BadRequest("image_url must be a data: URL (data:image/png;base64,...): this "
                         "server does not fetch pictures from the network")
    head, _, data = url.partition(",")
    if not head.endswith(";base64"):
        raise BadRequest("image_url data: URLs must be base64 (data:image/png;base64,...)")
    return _image(data)
