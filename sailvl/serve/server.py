"""The OpenAI-compatible HTTP server (FastAPI + uvicorn, the `serve` extra) over an `Engine`.

Endpoints: POST /v1/chat/completions (streaming or not), GET /v1/models, GET /health, GET /metrics
(Prometheus text), GET / (a minimal chat page). Safe by default: binds 127.0.0.1, optional API key, remote
image URLs and local files refused unless enabled, limits on body size, images per request and pixels.
Every invalid request gets a 4xx with OpenAI's error body ({"error": {"message", "type", "param", "code"}}).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data.image import ImageError
from ..data.schema import SkipSample
from ..data.template import THINK_END, THINK_START, parse_thinking
from .engine import CapacityError, ContextLengthError, Engine, EngineBusy, RequestHandle, RequestOutput
from .page import render_page
from .protocol import APIError, ImagePolicy, conversation, parse_request, sampling_params
from .sampling import TokenLogprob

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    images: ImagePolicy = field(default_factory=ImagePolicy)
    max_body_bytes: int = 32 * 2**20
    max_n: int = 8


class Metrics:
    """Counters and histograms in Prometheus' text format (no client library needed)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.hist = {name: [0] * (len(LATENCY_BUCKETS) + 1) + [0.0] for name in ("latency", "ttft")}

    def count(self, status: int) -> None:
        with self.lock:
            self.requests[str(status)] = self.requests.get(str(status), 0) + 1

    def observe(self, name: str, seconds: float) -> None:
        with self.lock:
            h = self.hist[name]
            h[next((i for i, b in enumerate(LATENCY_BUCKETS) if seconds <= b), len(LATENCY_BUCKETS))] += 1
            h[-1] += seconds

    def render(self, engine: Engine) -> str:
        s = engine.stats
        lines = ["# HELP sailvl_requests_total Chat completion requests by HTTP status.",
                 "# TYPE sailvl_requests_total counter"]
        with self.lock:
            lines += [f'sailvl_requests_total{{status="{k}"}} {v}' for k, v in sorted(self.requests.items())]
            for name, metric, what in (("latency", "sailvl_request_latency_seconds", "Request latency"),
                                       ("ttft", "sailvl_time_to_first_token_seconds", "Time to first token")):
                h = self.hist[name]
                lines += [f"# HELP {metric} {what} in seconds.", f"# TYPE {metric} histogram"]
                total = 0
                for b, c in zip((*LATENCY_BUCKETS, "+Inf"), h[:-1]):
                    total += c
                    lines.append(f'{metric}_bucket{{le="{b}"}} {total}')
                lines += [f"{metric}_sum {h[-1]:.6f}", f"{metric}_count {total}"]
        for name, key, kind, what in (
                ("sailvl_prompt_tokens_total", "prompt_tokens", "counter", "Prompt tokens (image tokens included)."),
                ("sailvl_image_tokens_total", "image_tokens", "counter", "Image tokens in prompts."),
                ("sailvl_generation_tokens_total", "generated_tokens", "counter", "Generated tokens."),
                ("sailvl_engine_requests_failed_total", "requests_failed", "counter", "Requests the engine failed."),
                ("sailvl_decode_steps_total", "decode_steps", "counter", "Batched decode forwards."),
                ("sailvl_prefills_total", "prefills", "counter", "Prompt prefills (one per request).")):
            lines += [f"# HELP {name} {what}", f"# TYPE {name} {kind}", f"{name} {s[key]}"]
        lines += ["# HELP sailvl_queue_length Requests waiting for capacity.", "# TYPE sailvl_queue_length gauge",
                  f"sailvl_queue_length {engine.num_waiting}",
                  "# HELP sailvl_running_sequences Sequences in the running batch.",
                  "# TYPE sailvl_running_sequences gauge", f"sailvl_running_sequences {engine.num_running}"]
        return "\n".join(lines) + "\n"


class ThinkingSplitter:
    """Splits streamed text into reasoning (inside a leading <think>...</think>) and the rest, releasing
    reasoning as it arrives. Chunking never changes the result, so streamed and non-streamed responses agree:
    reasoning is stripped (a trailing whitespace run is held back until more text follows)."""

    def __init__(self):
        self.text, self.sent = "", 0

    def _reasoning(self, final: bool) -> str:
        t = self.text.lstrip()
        if not t.startswith(THINK_START):
            return ""
        body = t[len(THINK_START):]
        end = body.find(THINK_END)
        if end != -1:
            return body[:end].strip()
        if not final:  # hold back what may be the start of </think>, and trailing whitespace
            for k in range(min(len(THINK_END) - 1, len(body)), 0, -1):
                if body.endswith(THINK_END[:k]):
                    body = body[:-k]
                    break
        return body.strip()

    def feed(self, delta: str) -> str:
        self.text += delta
        r = self._reasoning(final=False)
        out, self.sent = r[self.sent:], max(self.sent, len(r))
        return out

    def finish(self) -> tuple[str, str | None, str]:
        """(last reasoning delta, whole reasoning or None, answer)."""
        r = self._reasoning(final=True)
        last = r[self.sent:]
        self.sent = len(r)
        has = self.text.lstrip().startswith(THINK_START) or THINK_END in self.text
        return last, (r if has else None), parse_thinking(self.text)[1]


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    """The FastAPI app serving `engine` (which must be started, or be started by the caller)."""
    app = FastAPI(title="sailvl", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics()
    proc = engine.processor
    created = int(time.time())

    def token_entry(t: TokenLogprob) -> dict:
        def one(tid: int, lp: float) -> dict:
            s = proc.decode([tid], skip_special_tokens=False)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
        return {**one(t.token_id, t.logprob), "top_logprobs": [one(i, lp) for i, lp in t.top]}

    def usage(out: RequestOutput) -> dict:
        return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                "total_tokens": out.prompt_tokens + out.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": 0, "image_tokens": out.image_tokens}}

    def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(token.encode(), config.api_key.encode()):
            raise APIError(401, "missing or incorrect API key (send Authorization: Bearer KEY)",
                           code="invalid_api_key")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _error(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return _error(APIError(e.status_code, str(e.detail), code=code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return _error(APIError(400, str(e.errors()[:1]), code="invalid_value"))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        log.exception("internal error")
        return _error(APIError(500, "internal server error", type="server_error", code="internal_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def get_metrics():
        return PlainTextResponse(metrics.render(engine), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(render_page(config.model_name))

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": created,
                                            "owned_by": "sailvl", "max_model_len": engine.context}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        t0 = time.perf_counter()
        try:
            check_key(request)
            body = await read_body(request, config.max_body_bytes)
            req = parse_request(body, config.max_n)
            if req.model != config.model_name:
                raise APIError(404, f"the model {req.model!r} does not exist; this server serves "
                               f"{config.model_name!r}", param="model", code="model_not_found")
            params = sampling_params(req)
            prompt = await run_in_threadpool(make_prompt, engine, req, config.images)
            handle = submit(engine, prompt, params, asyncio.get_running_loop(), req.stream)
        except APIError as e:
            metrics.count(e.status)
            return _error(e)
        rid, model = f"chatcmpl-{uuid.uuid4().hex}", config.model_name
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            metrics.count(200)
            return StreamingResponse(stream(handle, req, rid, model, include_usage, t0),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            async for _ in handle:  # submitted without token events: this waits for the end
                pass
            out = handle.result()
        except ValueError as e:
            metrics.count(400)
            return _error(APIError(400, str(e), code="invalid_value"))
        finally:
            handle.cancel()  # no-op when finished; frees the engine if this task was cancelled
        metrics.count(200)
        metrics.observe("latency", time.perf_counter() - t0)
        metrics.observe("ttft", out.time_to_first_token)
        choices = []
        for c in out.choices:
            msg = {"role": "assistant", "content": c.text}
            if req.separate_thinking:
                split = ThinkingSplitter()
                split.feed(c.text)
                _, msg["reasoning_content"], msg["content"] = split.finish()
            lp = {"content": [token_entry(t) for t in c.logprobs]} if c.logprobs is not None else None
            choices.append({"index": c.index, "message": msg, "logprobs": lp, "finish_reason": c.finish_reason})
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
                "system_fingerprint": None, "choices": choices, "usage": usage(out)}

    async def stream(handle, req, rid: str, model: str, include_usage: bool, t0: float):
        now = int(time.time())

        def chunk(choices: list, usage_obj=None, with_usage=include_usage) -> str:
            obj = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model,
                   "system_fingerprint": None, "choices": choices}
            if with_usage:
                obj["usage"] = usage_obj
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        def delta(index: int, d: dict, lp=None, finish=None) -> dict:
            return {"index": index, "delta": d, "logprobs": lp, "finish_reason": finish}

        splitters = {i: ThinkingSplitter() for i in range(req.n)} if req.separate_thinking else None
        try:
            for i in range(req.n):
                yield chunk([delta(i, {"role": "assistant", "content": ""})])
            first = True
            async for ev in handle:
                if first and ev.token_id is not None:
                    metrics.observe("ttft", time.perf_counter() - t0)
                    first = False
                lp = {"content": [token_entry(ev.logprob)]} if ev.logprob is not None else None
                d = {}
                if splitters is None:
                    if ev.text:
                        d["content"] = ev.text
                else:
                    r = splitters[ev.index].feed(ev.text)
                    if ev.finish_reason is not None:
                        last, _, answer = splitters[ev.index].finish()
                        r += last
                        d["content"] = answer
                    if r:
                        d["reasoning_content"] = r
                if d or lp is not None:
                    yield chunk([delta(ev.index, d, lp)])
                if ev.finish_reason is not None:
                    yield chunk([delta(ev.index, {}, None, ev.finish_reason)])
            out = handle.result()
            metrics.observe("latency", time.perf_counter() - t0)
            if include_usage:
                yield chunk([], usage(out))
            yield "data: [DONE]\n\n"
        except ValueError as e:  # a request the engine rejected after the response started
            yield f"data: {json.dumps(APIError(400, str(e), code='invalid_value').body())}\n\ndata: [DONE]\n\n"
        except RuntimeError as e:
            yield f"data: {json.dumps(APIError(500, str(e), type='server_error').body())}\n\ndata: [DONE]\n\n"
        finally:  # also when the client went away: stop generating for it
            handle.cancel()

    app.state.engine, app.state.metrics = engine, metrics
    return app


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or a 413 as soon as it passes `limit` bytes (never buffered beyond that)."""
    too_big = APIError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise too_big
        chunks.append(part)
    return b"".join(chunks)


def make_prompt(engine: Engine, req, policy: ImagePolicy):
    """Request -> engine Prompt (images decoded and tiled here, in a worker thread); bad input -> APIError."""
    messages, images, system = conversation(req, policy)
    try:
        return engine.prepare(messages, images, thinking=req.thinking_mode, system=system)
    except (ImageError, SkipSample, ValueError) as e:
        raise APIError(400, f"bad input: {e}", param="messages", code="invalid_value") from None


def submit(engine: Engine, prompt, params, loop, stream: bool) -> RequestHandle:
    """`engine.submit`, with its refusals as API errors."""
    try:
        return engine.submit(prompt, params, loop=loop, stream=stream)
    except ContextLengthError as e:
        raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None
    except CapacityError as e:
        raise APIError(400, str(e), code="request_too_large") from None
    except EngineBusy as e:
        raise APIError(429, str(e), type="server_error", code="server_overloaded") from None
    except ValueError as e:
        raise APIError(400, str(e), code="invalid_value") from None


def wait_healthy(url: str, timeout: float = 120.0, alive=lambda: True) -> None:
    """Poll `url`/health until it answers 200; RuntimeError when `alive()` turns false or `timeout` passes
    (for a `sailvl serve` started as a subprocess: `alive=lambda: proc.poll() is None`)."""
    import httpx

    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if not alive() or time.time() > deadline:
            raise RuntimeError(f"the server at {url} did not come up")
        time.sleep(0.2)


class ServerThread:
    """uvicorn in a background thread on a free port (tests, benchmarks). `url` is the base URL."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 8000, *, api_key: str | None = None,
          served_model_name: str | None = None, allow_remote_images: bool = False, allow_local_files: bool = False,
          max_body_mb: float = 32, max_images: int = 8, max_image_pixels: int = 40_000_000, max_n: int = 8,
          max_seqs: int = 16, max_cached_tokens: int = 65536, dtype: str | None = None,
          device: str | None = None) -> None:
    """Load a SAIL-VL2 model directory and serve it until interrupted."""
    import uvicorn

    engine = load_engine(model, dtype=dtype, device=device, max_seqs=max_seqs, max_cached_tokens=max_cached_tokens)
    config = ServerConfig(served_model_name or Path(model).resolve().name, api_key,
                          ImagePolicy(max_images, max_image_pixels, int(max_body_mb * 2**20), allow_remote_images,
                                      allow_local_files), int(max_body_mb * 2**20), max_n)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        log.warning("serving on %s without --api-key: anyone who can reach this address can use the model", host)
    with engine:
        print(f"sailvl serve: {config.model_name} on http://{host}:{port} (chat page at /)", flush=True)
        uvicorn.run(create_app(engine, config), host=host, port=port, log_level="info")


def load_engine(model: str | Path, dtype: str | None = None, device: str | None = None, **engine_kw) -> Engine:
    """A model directory -> an (unstarted) Engine with its processor."""
    import torch

    from ..data.processor import Processor
    from ..model.vlm import SailVL

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        dtype = "bfloat16" if str(device).startswith("cuda") else "float32"
    m = SailVL.from_pretrained(model, dtype=getattr(torch, dtype), device=device)
    return Engine(m, Processor.from_pretrained(model), **engine_kw)
