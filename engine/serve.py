"""python -m engine.serve: the generation engine behind an HTTP JSON API, for frontends that
do not run Python.

  python -m engine.serve --run runs/tiny --port 8000
  curl -s localhost:8000/v1/generate -d '{"prompt": "a red circle", "n": 4}'

POST /v1/generate with a JSON object:
  prompt           caption, question, instruction or text with <mask> (optional with image)
  image            an input image, base64 (PNG, JPEG, ...; any size, fitted as the CLI fits it)
  output           "image" or "text"; default inferred as python -m engine.generate infers it
  n, seed, cfg_scale, image_cfg_scale, cd_k ([alpha, k]), temperature, top_p, top_k,
  max_new_tokens   as engine.inference.SamplingParams (unset: the run's sampling defaults)
answers {"output": ..., "samples": [{"text", "image" (base64 PNG or null), "token_ids",
"finish_reason", "score"}]}. GET /health answers {"status": "ok", "run", "model", "device",
"dtype"}.
A bad request is a 400 with {"error": "..."} (the engine's own message); an unknown path a 404;
a body over 16 MiB a 413. A batch that fails is rerun one request at a time, so a request
that cannot run fails alone.

OpenAI's API is served too (GET /v1/models, POST /v1/images/generations and
/v1/chat/completions; engine/serve_openai.py), for clients written for it.

Batching: one worker thread owns the engine. Requests without a seed that are waiting when it
becomes free run as one engine.generate call, whatever they ask for (output, n, sampling
fields): their prompts share every forward, and those asking for the same settings sample
together under one fresh random seed (each other setting under its own). A request with a
seed runs in a call of its own, so the same seed gives the same samples
(in a batch its logits could differ from a lone run's in the last bits, and so its draws).
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import itertools
import json
import queue
import random
import sys
import threading
import traceback
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

from engine.checkpoint import CheckpointError
from engine.devices import INFERENCE_DTYPES

MAX_BODY = 16 * 2**20
SAMPLING = ("n", "seed", "cfg_scale", "image_cfg_scale", "cd_k", "temperature", "top_p", "top_k",
            "max_new_tokens")
FIELDS = {"prompt", "image", "output", *SAMPLING}


class BadRequest(ValueError):
    """The request itself is wrong: answered with a 400 and this message."""


class Service:
    """One engine, its run's sampling defaults, and the worker that batches requests."""

    def __init__(self, run: Path, device: str | None = None, dtype: str = "float32",
                 max_batch: int = 32, model_name: str | None = None):
        from engine.inference import Engine
        from engine.run_artifacts import RunDir
        self.engine = Engine.from_run(run, device, dtype=dtype)
        self.defaults = RunDir(run).load_config().sample
        self.model_name = model_name or Path(run).resolve().name
        self.created = int(RunDir(run).config.stat().st_mtime)
        self.info = {"status": "ok", "run": str(run), "model": self.model_name,
                     "device": str(self.engine.device), "dtype": dtype}
        self.batcher = Batcher(self.engine, max_batch)

    def run(self, items: list, modality: str, fields: dict, on_token=None):
        """The engine's GenerationResult for one prompt (`items`: its pictures and text, in
        order) with the SamplingParams `fields` it gives (unset: the run's defaults), run
        through the batching worker."""
        return self.submit(items, modality, fields, on_token).result()

    def submit(self, items: list, modality: str, fields: dict, on_token=None) -> Future:
        """`run` without waiting: a Future of the result. `on_token(sample_index, token_id)`
        hears each token as it is chosen, from the worker thread."""
        from engine.inference.params import with_run_defaults
        sampling = {k: fields.get(k) for k in SAMPLING}
        if sampling["cd_k"] is not None:
            sampling["cd_k"] = _cd_k(sampling["cd_k"])
        params = with_run_defaults(self.defaults, modality, **sampling)
        params.validate()  # a bad setting is this request's 400, not its batch's failure
        return self.batcher.submit(items, params, fields.get("seed") is not None, on_token)

    def generate(self, request: dict) -> dict:
        """POST /v1/generate: our own request and answer (the module's docstring)."""
        from engine.generate import output_modality
        unknown = set(request) - FIELDS
        if unknown:
            raise BadRequest(f"unknown fields {sorted(unknown)}; known: {sorted(FIELDS)}")
        prompt, image = request.get("prompt"), _image(request.get("image"))
        if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
            raise BadRequest("prompt must be a non-empty string (or leave it out and send an "
                             "image to caption)")
        if prompt is None and image is None:
            raise BadRequest("send a prompt, an image, or both")
        output = request.get("output")
        if output not in (None, "image", "text"):
            raise BadRequest(f"output must be \"image\" or \"text\"; got {output!r}")
        modality = output_modality(SimpleNamespace(output=output, prompt=prompt,
                                                   image=None if image is None else "sent"))
        result = self.run([x for x in (image, prompt) if x is not None], modality, request)
        return {"output": modality, "samples": [
            {"text": smp.text, "image": _base64(smp.images[0]) if smp.images else None,
             "token_ids": smp.token_ids, "finish_reason": smp.finish_reason,
             "score": smp.score} for smp in result.samples]}


class Batcher:
    """The engine's only user: a worker thread that runs what is waiting, grouped."""

    def __init__(self, engine, max_batch: int):
        self.engine, self.max_batch = engine, max_batch
        self.waiting: queue.Queue = queue.Queue()
        threading.Thread(target=self._work, daemon=True, name="engine").start()

    def submit(self, items: list, params, seeded: bool, on_token=None) -> Future:
        job = _Job(items, params, seeded, Future(), _Listener(on_token))
        self.waiting.put(job)
        return job.done

    def _work(self) -> None:
        while True:
            batch = [self.waiting.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.waiting.get_nowait())
                except queue.Empty:
                    break
            unseeded = [job for job in batch if not job.seeded]
            if unseeded:
                self._run(unseeded)
            for job in batch:
                if job.seeded:
                    self._run([job])  # alone: its seed decides its samples

    def _run(self, jobs: list[_Job]) -> None:
        # Unseeded requests asking for the same settings share one SamplingParams (one fresh
        # seed), so they sample together in one call a step; other settings get their own.
        settings, shared = [], {}
        for job in jobs:
            params = job.params
            if not job.seeded:
                key = dataclasses.astuple(dataclasses.replace(params, seed=0))
                params = shared.setdefault(
                    key, dataclasses.replace(params, seed=random.randrange(2**31)))
            settings.append(params)
        streaming = any(job.listener.wanted for job in jobs)
        try:
            results = self.engine.generate(
                [job.items for job in jobs], settings,
                on_token=(lambda prompt, sample, token: jobs[prompt].listener(sample, token))
                if streaming else None)
        except Exception as exc:  # noqa: BLE001 (handed to the requests, raised there)
            # One request's prompt may be the cause: each runs again on its own, except a
            # request whose stream has begun (a rerun would send its tokens twice): it fails.
            for job in jobs:
                if len(jobs) > 1 and not job.listener.heard:
                    self._run([job])
                else:
                    job.done.set_exception(exc)
            return
        for job, result in zip(jobs, results):
            job.done.set_result(result)


class _Job(NamedTuple):
    items: list          # the prompt: pictures and text, in order
    params: object       # its SamplingParams
    seeded: bool         # asked for a seed: runs alone
    done: Future
    listener: "_Listener"


class _Listener:
    """A request's on_token, remembering whether it has heard anything."""

    def __init__(self, on_token=None):
        self.on_token, self.heard = on_token, False

    @property
    def wanted(self) -> bool:
        return self.on_token is not None

    def __call__(self, sample: int, token: int) -> None:
        if self.on_token is not None:
            self.heard = True
            self.on_token(sample, token)


def _image(data):
    if data is None:
        return None
    from engine.inference.prompts import read_image
    if not isinstance(data, str):
        raise BadRequest("image must be a base64 string")
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError:
        raise BadRequest("image is not valid base64") from None
    return read_image(io.BytesIO(raw), "the image sent")


def _cd_k(value) -> tuple[float, int]:
    if not (isinstance(value, list) and len(value) == 2):
        raise BadRequest(f"cd_k takes [alpha, k], e.g. [0.1, 8]; got {value!r}")
    return float(value[0]), int(value[1])


def _base64(image, fmt: str = "PNG", quality: int | None = None) -> str:
    """A picture as base64 text, in PIL's format `fmt` (JPEG/WebP at `quality` when given)."""
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({} if quality is None or fmt == "PNG" else {"quality": quality}))
    return base64.b64encode(buf.getvalue()).decode("ascii")


def make_handler(service: Service):
    from engine import serve_openai as openai
    # POST routes: path -> (what answers it, whether its errors take OpenAI's shape)
    posts = {"/v1/generate": (service.generate, False),
             "/v1/images/generations": (lambda body: openai.images_generations(service, body), True),
             "/v1/chat/completions": (lambda body: openai.chat_completions(service, body), True)}

    class Handler(BaseHTTPRequestHandler):
        server_version = "cm3leon-engine"

        def _answer(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802 (http.server's naming)
            if self.path == "/health":
                self._answer(200, service.info)
            elif self.path == "/v1/models":
                self._answer(200, openai.models(service))
            else:
                self._answer(404, {"error": f"no such path {self.path}; try /health or /v1/models"})

        def _fail(self, status: int, message: str, openai_shape: bool, kind="invalid_request_error",
                  code=None) -> None:
            self._answer(status, openai.error_body(message, kind, code) if openai_shape
                         else {"error": message})

        def do_POST(self):  # noqa: N802
            if self.path not in posts:
                self._answer(404, {"error": f"no such path {self.path}; POST one of {sorted(posts)}"})
                return
            answer, openai_shape = posts[self.path]
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self._fail(413, f"the body is {length} bytes; at most {MAX_BODY}", openai_shape)
                return
            try:
                request = json.loads(self.rfile.read(length) or b"null")
            except json.JSONDecodeError as exc:
                self._fail(400, f"the body is not JSON: {exc}", openai_shape)
                return
            if not isinstance(request, dict):
                self._fail(400, "the body must be a JSON object", openai_shape)
                return
            try:
                body = answer(request)
                if not isinstance(body, dict):  # a stream: its first chunk, or its error
                    first = next(body)
            except openai.ModelNotFound as exc:
                self._fail(404, str(exc), openai_shape, code="model_not_found")
            except (ValueError, TypeError) as exc:  # BadRequest and the engine's own checks
                self._fail(400, str(exc), openai_shape)
            except Exception as exc:  # a fault of ours: say so, keep serving, keep the trace
                traceback.print_exc()
                self._fail(500, f"internal error: {type(exc).__name__}: {exc}", openai_shape,
                           kind="server_error")
            else:
                if isinstance(body, dict):
                    self._answer(200, body)
                else:
                    self._stream(first, body)

        def _stream(self, first: dict, rest) -> None:
            """Server-sent events, one a chunk, then [DONE]; the connection closes after."""
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            try:
                for event in itertools.chain([first], rest):
                    self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                    self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                return  # the client left; the batch it was in goes on without it
            except Exception as exc:  # after the 200: the error travels as an event
                traceback.print_exc()
                error = openai.error_body(f"{type(exc).__name__}: {exc}", "server_error")
                self.wfile.write(b"data: " + json.dumps(error).encode() + b"\n\n")
            self.wfile.write(b"data: [DONE]\n\n")

        def log_message(self, fmt, *args):  # one line a request on stderr, as usual
            sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

    return Handler


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m engine.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a run directory from python -m engine.train")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--dtype", default="float32", choices=list(INFERENCE_DTYPES))
    ap.add_argument("--served-model-name", default=None, metavar="NAME",
                    help="the model's name in the OpenAI-compatible routes (default: the run "
                         "directory's name)")
    ap.add_argument("--max-batch", type=int, default=32,
                    help="most waiting requests run in one engine call (each brings its n "
                         "samples, twice over with CFG); 1 = one call per request")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.max_batch < 1:
            raise ValueError("--max-batch must be >= 1")
        service = Service(args.run, args.device, args.dtype, args.max_batch,
                          args.served_model_name)
        server = ThreadingHTTPServer((args.host, args.port), make_handler(service))
    except (ValueError, FileNotFoundError, CheckpointError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"serving {args.run} on http://{args.host}:{server.server_address[1]} "
          f"({service.info['device']}, {args.dtype}) as model {service.model_name!r}; "
          "POST /v1/generate, /v1/images/generations, /v1/chat/completions; GET /health, "
          "/v1/models",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
