"""The inference engine: token ids (and images) in, token ids and text out. No HTTP here.

Features:
  - continuous batching: requests join and leave the running batch between decode steps. The batch's KV
    cache is one `KVCache` whose rows are right-aligned (left padding behind a key mask, as in
    `sailvl.model.generate`), so every decode step is one batched forward. When the set of sequences
    changes the cache is rebuilt: live rows are copied over and columns that only hold padding are dropped;
    between changes nothing is copied;
  - a request is prefilled alone: its images (or video frames) are encoded once, and for n > 1 choices the
    prefilled cache row is copied n times;
  - per-sequence sampling settings and torch.Generator (seeded), so a sequence's tokens never depend on
    what else is running: greedy output equals `generate`'s, concurrent output equals output sent alone;
  - bounded memory: at most `max_seqs` sequences and `max_cached_tokens` cache slots (rows x row capacity,
    reserved up front for prompt + max new tokens, so nothing is ever evicted); requests over capacity wait
    in a FIFO queue; a prompt that does not fit the context raises `ContextLengthError` at submission;
  - streaming: each request's events (token id, text delta, logprobs, finish reason) go to a queue that the
    caller iterates (`for ev in handle`) or async-iterates (`async for ev in handle`, with `loop=`);
  - thinking mode per request: the prompt asks for <think> reasoning; results carry `thinking` and `answer`.

Run it with a background thread (`start()` / `with engine:`) or drive it by hand with `step()` (tests).

Letters: B batch rows, S cache length, V vocab.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..data.template import parse_thinking
from ..model.attention import KVCache
from ..model.generate import GenerationConfig
from .sampling import SamplingParams, TextStream, TokenLogprob, next_tokens, token_logprobs

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS, DEFAULT_MAX_NEW_TOKENS_THINKING = 1024, 4096  # SAIL-VL2's eval settings


class ContextLengthError(ValueError):
    """The prompt (plus the tokens asked for) does not fit the model's context."""


class CapacityError(ValueError):
    """A request that can never fit the engine's limits (more choices or cache than it has)."""


class EngineBusy(RuntimeError):
    """The waiting queue is full; try again later."""


@dataclass
class Prompt:
    """Model input of one request: token ids with `<IMG_CONTEXT>` slots, and the images' pixels (any device)."""

    input_ids: list[int]
    pixel_values: torch.Tensor | list[torch.Tensor] | None = None
    num_image_tokens: int = 0
    thinking: bool = False


@dataclass
class TokenEvent:
    """One streamed step of one choice: a new token (None on a closing event), the text it released, and
    the finish reason on the choice's last event ("stop", "length" or "abort")."""

    index: int
    token_id: int | None
    text: str
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None


@dataclass
class Choice:
    index: int
    token_ids: list[int]  # without the stop token id
    text: str  # cut before a stop string
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None
    thinking: str | None = None  # thinking mode: the text inside <think>...</think>
    answer: str | None = None  # thinking mode: the last \boxed{} (or the text after </think>)


@dataclass
class RequestOutput:
    request_id: int
    choices: list[Choice]
    prompt_tokens: int  # image tokens included
    image_tokens: int
    completion_tokens: int  # every sampled token, stop token ids included
    time_to_first_token: float  # seconds from submission
    latency: float


class RequestHandle:
    """What `Engine.submit` returns: iterate it for events, `result()` for the whole output, `cancel()`.
    Without a background thread, iterating or waiting runs the engine's steps in the caller's thread."""

    _END = object()

    def __init__(self, request_id: int, engine: Engine, loop: asyncio.AbstractEventLoop | None = None,
                 events: bool = True):
        self.id = request_id
        self._engine, self._loop, self._events = engine, loop, events
        self._sync: queue.Queue = queue.Queue()
        self._async: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self._done = threading.Event()
        self._output: RequestOutput | None = None
        self._error: BaseException | None = None
        self.cancelled = False

    def cancel(self) -> None:
        """Stop generating (at the next engine step); unfinished choices end with finish_reason "abort"."""
        self.cancelled = True

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> RequestOutput:
        while not self._engine.running and not self._done.is_set():
            self._engine.step()
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} not finished after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._output

    def __iter__(self):
        if self._async is not None:
            raise TypeError("this handle streams to an asyncio loop; use `async for`")
        while True:
            while not self._engine.running and self._sync.empty():
                self._engine.step()
            if (item := self._sync.get()) is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def __aiter__(self):
        if self._async is None:
            raise TypeError("this handle was submitted without loop=; use a plain `for`")
        if not self._engine.running:
            raise RuntimeError("async iteration needs a running engine (engine.start())")
        while (item := await self._async.get()) is not self._END:
            if isinstance(item, BaseException):
                raise item
            yield item

    # engine side
    def _push(self, item) -> None:
        if not self._events and isinstance(item, TokenEvent):
            return
        if self._async is None:
            self._sync.put(item)
            return
        try:
            self._loop.call_soon_threadsafe(self._async.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is closed: nobody will read this request
            self.cancelled = True

    def _finish(self, output: RequestOutput | None, error: BaseException | None = None) -> None:
        self._output, self._error = output, error
        if error is not None:
            self._push(error)
        self._push(self._END)
        self._done.set()


@dataclass
class _Request:
    id: int
    prompt: Prompt
    params: SamplingParams
    max_new: int
    handle: RequestHandle
    submitted: float
    gen_cfg: GenerationConfig | None = None  # the sampling settings as `generate` reads them
    first_token: float | None = None
    seqs: list[_Seq] = field(default_factory=list)


@dataclass
class _Seq:
    req: _Request
    index: int
    generator: torch.Generator | None
    text: TextStream
    cached: int = 0  # tokens of this sequence in the KV cache (= next position id)
    pending: int | None = None  # sampled, not yet fed to the model
    tokens: list[int] = field(default_factory=list)
    sampled: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    row: int = -1  # row in the batch cache

    @property
    def remaining(self) -> int:
        """Forward steps this sequence may still need (the last sampled token is never fed)."""
        return max(self.req.max_new - max(self.sampled, 1), 0)


def _layout(cached: Sequence[int], remaining: Sequence[int]) -> tuple[int, int]:
    """(filled length, capacity) of a right-aligned batch cache holding these sequences."""
    length = max(cached)
    return length, length + max(remaining)


class Engine:
    """Continuous-batching generation over a `SailVL` (see the module docstring)."""

    def __init__(self, model, processor=None, *, max_seqs: int = 16, max_cached_tokens: int = 65536,
                 max_queue: int = 1024, default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 default_max_new_tokens_thinking: int = DEFAULT_MAX_NEW_TOKENS_THINKING,
                 skip_special_tokens: bool = True):
        if max_seqs < 1 or max_cached_tokens < 2 or max_queue < 0:
            raise ValueError("need max_seqs >= 1, max_cached_tokens >= 2, max_queue >= 0")
        self.model, self.processor = model.eval(), processor
        self.max_seqs, self.max_cached_tokens, self.max_queue = max_seqs, max_cached_tokens, max_queue
        self.default_max_new = default_max_new_tokens
        self.default_max_new_thinking = default_max_new_tokens_thinking
        self.context = model.config.llm_config.max_position_embeddings
        self.stop_ids = {processor.im_end_id} if processor is not None else set()
        self._skip_special = skip_special_tokens
        self._waiting: deque[_Request] = deque()
        self._seqs: list[_Seq] = []  # the running batch, in cache-row order
        self._cache: KVCache | None = None
        self._ids = itertools.count()
        self._cv = threading.Condition()
        self._step_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.stats = {"requests": 0, "requests_failed": 0, "prompt_tokens": 0, "image_tokens": 0,
                      "generated_tokens": 0, "decode_steps": 0, "prefills": 0, "max_running": 0}

    # ------------------------------------------------------------------------------------- lifecycle
    def start(self) -> Engine:
        """Run the engine loop in a daemon thread."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="sailvl-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """Whether a background thread drives the engine (else `step()`, `result()` or iterating a handle do)."""
        return self._thread is not None

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._seqs)

    # ------------------------------------------------------------------------------------ submission
    def prepare(self, messages: list[dict], images: Sequence = (), video=None, *, thinking: bool = False,
                system: str | None = None) -> Prompt:
        """Chat messages (with `<image>` / `<video>` placeholders) + images / video -> a Prompt, through the
        processor (tiling, chat template, thinking suffix). Raises ImageError / ValueError on bad input."""
        if self.processor is None:
            raise ValueError("this engine has no processor; submit token ids")
        inputs = self.processor(messages, list(images), video, thinking=thinking, add_generation_prompt=True,
                                system=system)
        return Prompt(inputs["input_ids"].tolist(), inputs["pixel_values"], inputs["num_image_tokens"], thinking)

    def submit(self, prompt: Prompt | Sequence[int], params: SamplingParams | None = None, *,
               loop: asyncio.AbstractEventLoop | None = None, stream: bool = True) -> RequestHandle:
        """Queue a request; returns at once. With `loop`, events go to that asyncio loop (`async for`); with
        stream=False no per-token events are sent (iterating just waits for the end: fewer wake-ups).
        Raises ContextLengthError, CapacityError or EngineBusy (nothing is queued then)."""
        if not isinstance(prompt, Prompt):
            prompt = Prompt(list(prompt))
        params = params or SamplingParams()
        n_prompt = len(prompt.input_ids)
        if n_prompt == 0:
            raise ValueError("the prompt needs at least one token")
        if n_prompt >= self.context:
            raise ContextLengthError(f"the prompt has {n_prompt} tokens; the model's context is {self.context} tokens")
        if params.max_new_tokens is None:  # the default, shrunk to what the context and the cache budget leave
            default = self.default_max_new_thinking if prompt.thinking else self.default_max_new
            max_new = max(min(default, self.context - n_prompt, self.max_cached_tokens // params.n - n_prompt + 1), 1)
        else:
            max_new = params.max_new_tokens
            if n_prompt + max_new > self.context:
                raise ContextLengthError(f"the prompt has {n_prompt} tokens and {max_new} new tokens were asked "
                                         f"for: {n_prompt + max_new} > the model's context of {self.context} tokens")
        if params.n > self.max_seqs:
            raise CapacityError(f"n={params.n} choices > the engine's max_seqs={self.max_seqs}")
        _, cap = _layout([n_prompt], [max(max_new - 1, 0)])
        if params.n * cap > self.max_cached_tokens:
            raise CapacityError(f"the request needs {params.n} x {cap} cached tokens > the engine's "
                                f"max_cached_tokens={self.max_cached_tokens}")
        rid = next(self._ids)
        req = _Request(rid, prompt, params, max_new, RequestHandle(rid, self, loop, stream), time.perf_counter(),
                       params.generation_config())
        with self._cv:
            if len(self._waiting) >= self.max_queue:
                raise EngineBusy(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(req)
            self._cv.notify_all()
        return req.handle

    def generate(self, prompt: Prompt | Sequence[int], params: SamplingParams | None = None) -> RequestOutput:
        """Submit and wait (drives the engine itself when no background thread runs)."""
        return self.submit(prompt, params).result()

    # ------------------------------------------------------------------------------------------ loop
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._waiting and not self._seqs:
                    self._cv.wait()
                if self._stopping:
                    break
            try:
                self.step()
            except Exception as e:  # a bug must not kill the server: fail the batch, go on
                log.exception("engine step failed")
                self._fail_running(e)
        self._fail_running(RuntimeError("the engine stopped"))
        with self._cv:
            while self._waiting:
                self._waiting.popleft().handle._finish(None, RuntimeError("the engine stopped"))

    @torch.no_grad()
    def step(self) -> bool:
        """One engine iteration: retire finished sequences, admit (prefill) waiting requests that fit,
        rebuild the batch cache if its rows changed, then one decode step. Returns whether work was done."""
        with self._step_lock:
            alive = [s for s in self._seqs if s.finish_reason is None and not self._cancel(s)]
            changed = len(alive) != len(self._seqs)
            joined = self._admit(alive)
            if changed or joined:
                self._rebuild(alive, joined)
            if self._seqs:
                self._decode()
            self.stats["max_running"] = max(self.stats["max_running"], len(self._seqs))
            return bool(changed or joined or self._seqs)

    def _cancel(self, s: _Seq) -> bool:
        if s.req.handle.cancelled:
            self._finish_seq(s, "abort")
            return True
        return False

    def _admit(self, alive: list[_Seq]) -> list[tuple[_Seq, KVCache]]:
        """Prefill waiting requests (FIFO) while they fit; returns their new sequences with their 1-row caches."""
        joined: list[tuple[_Seq, KVCache]] = []
        while True:
            with self._cv:
                while self._waiting and self._waiting[0].handle.cancelled:
                    self._abort_waiting(self._waiting.popleft())
                if not self._waiting:
                    return joined
                req = self._waiting[0]
                rows = [s for s in alive] + [s for s, _ in joined]
                n_prompt, n = len(req.prompt.input_ids), req.params.n
                cached = [s.cached for s in rows] + [n_prompt] * n
                remaining = [s.remaining for s in rows] + [max(req.max_new - 1, 0)] * n
                if rows and (len(cached) > self.max_seqs
                             or len(cached) * _layout(cached, remaining)[1] > self.max_cached_tokens):
                    return joined
                self._waiting.popleft()
            try:
                joined += self._prefill(req)
            except Exception as e:  # noqa: BLE001 - bad input of one request fails only that request
                log.warning("request %d failed in prefill: %s", req.id, e)
                self.stats["requests_failed"] += 1
                req.handle._finish(None, e if isinstance(e, ValueError) else RuntimeError(f"prefill failed: {e}"))

    def _abort_waiting(self, req: _Request) -> None:
        req.seqs = [self._new_seq(req, i) for i in range(req.params.n)]
        for s in req.seqs:
            self._finish_seq(s, "abort")

    def _new_seq(self, req: _Request, index: int) -> _Seq:
        p = req.params
        gen = None
        if p.temperature > 0:
            seed = p.seed + index if p.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            gen = torch.Generator(device=self.model.device).manual_seed(seed)
        return _Seq(req, index, gen, TextStream(self._decode_text if self.processor is not None else _no_text, p.stop))

    def _decode_text(self, ids: list[int]) -> str:
        return self.processor.decode(ids, skip_special_tokens=self._skip_special)

    def _prefill(self, req: _Request) -> list[tuple[_Seq, KVCache]]:
        """Encode the prompt (images once) into a 1-row cache; sample each choice's first token."""
        m, prompt = self.model, req.prompt
        ids = torch.tensor([prompt.input_ids], device=m.device)
        P = ids.shape[1]
        pixels = prompt.pixel_values
        if pixels is not None:
            pixels = ([p.to(m.device, m.dtype) for p in pixels] if isinstance(pixels, list)
                      else pixels.to(m.device, m.dtype))
        cache = m.language_model.new_cache(1, P)
        cache.key_mask_BS = torch.ones(1, P, dtype=torch.bool, device=m.device)  # as `generate` runs a prompt
        positions = torch.arange(P, device=m.device)[None]
        req.seqs = [self._new_seq(req, i) for i in range(req.params.n)]
        self.stats["prefills"] += 1
        if req.max_new == 0:
            for s in req.seqs:
                self._finish_seq(s, "length")
            return []
        logits_1V = m(ids, pixel_values=pixels, position_ids=positions, cache=cache, logits_to_keep=1).logits[:, -1]
        for s in req.seqs:
            s.cached = P
        self._accept(req.seqs, logits_1V.expand(len(req.seqs), -1))
        return [(s, cache) for s in req.seqs if s.finish_reason is None]

    def _rebuild(self, alive: list[_Seq], joined: list[tuple[_Seq, KVCache]]) -> None:
        """A new right-aligned batch cache for `alive` + `joined` (rows copied; padding-only columns dropped)."""
        old = self._cache
        sources = [(s, old, s.row) for s in alive] + [(s, c, 0) for s, c in joined]
        self._seqs = [s for s, _, _ in sources]
        if not sources:
            self._cache = None
            return
        S, cap = _layout([s.cached for s in self._seqs], [s.remaining for s in self._seqs])
        m = self.model
        cache = m.language_model.new_cache(len(sources), cap)
        mask = torch.zeros(len(sources), cap, dtype=torch.bool, device=m.device)
        mask[:, S:] = True  # every row advances in step: future slots are real tokens of every row
        for j, (s, src, row) in enumerate(sources):
            n, end = s.cached, src.length
            cache.k[:, j, :, S - n:S] = src.k[:, row, :, end - n:end]
            cache.v[:, j, :, S - n:S] = src.v[:, row, :, end - n:end]
            mask[j, S - n:S] = True
            s.row = j
        # without padding (one row, or rows of equal length) attention needs no mask: a faster SDPA path
        cache.length, cache.key_mask_BS = S, (None if bool(mask.all()) else mask)
        self._cache = cache

    def _decode(self) -> None:
        seqs, m = self._seqs, self.model
        ids = torch.tensor([[s.pending] for s in seqs], device=m.device)
        positions = torch.tensor([[s.cached] for s in seqs], device=m.device)
        logits_BV = m(ids, position_ids=positions, cache=self._cache, logits_to_keep=1).logits[:, -1]
        self.stats["decode_steps"] += 1
        for s in seqs:
            s.cached += 1
            s.pending = None
        self._accept(seqs, logits_BV)

    def _accept(self, seqs: list[_Seq], logits_BV: torch.Tensor) -> None:
        """Sample one token for each row and hand it to its sequence (stop, length, stream)."""
        tokens = next_tokens(logits_BV, [s.req.gen_cfg for s in seqs],
                             [s.generator for s in seqs])
        want = [i for i, s in enumerate(seqs) if s.req.params.logprobs]
        lps = dict(zip(want, token_logprobs(logits_BV[want], [tokens[i] for i in want],
                                            [seqs[i].req.params.top_logprobs for i in want]))) if want else {}
        now = time.perf_counter()
        for i, (s, tok) in enumerate(zip(seqs, tokens)):
            s.sampled += 1
            self.stats["generated_tokens"] += 1
            if s.req.first_token is None:
                s.req.first_token = now
            p = s.req.params
            if (tok in self.stop_ids and not p.ignore_eos) or tok in p.stop_token_ids:
                self._finish_seq(s, "stop")
                continue
            s.tokens.append(tok)
            if i in lps:
                s.logprobs.append(lps[i])
            delta = s.text.add(tok)
            s.req.handle._push(TokenEvent(s.index, tok, delta, lps.get(i)))
            if s.text.stopped:
                self._finish_seq(s, "stop")
            elif s.sampled >= s.req.max_new:
                self._finish_seq(s, "length")
            else:
                s.pending = tok

    def _finish_seq(self, s: _Seq, reason: str) -> None:
        s.finish_reason = reason
        s.req.handle._push(TokenEvent(s.index, None, s.text.finish(), None, reason))
        req = s.req
        if all(x.finish_reason is not None for x in req.seqs):
            self._finish_request(req)

    def _finish_request(self, req: _Request) -> None:
        now = time.perf_counter()
        choices = []
        for s in req.seqs:
            c = Choice(s.index, s.tokens, s.text.text, s.finish_reason, s.logprobs if req.params.logprobs else None)
            if req.prompt.thinking:
                c.thinking, c.answer = parse_thinking(c.text)
            choices.append(c)
        out = RequestOutput(req.id, choices, len(req.prompt.input_ids), req.prompt.num_image_tokens,
                            sum(s.sampled for s in req.seqs), (req.first_token or now) - req.submitted,
                            now - req.submitted)
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += out.prompt_tokens
        self.stats["image_tokens"] += out.image_tokens
        req.handle._finish(out)

    def _fail_running(self, error: BaseException) -> None:
        failed = {id(s.req): s.req for s in self._seqs if not s.req.handle.done()}
        for req in failed.values():
            self.stats["requests_failed"] += 1
            req.handle._finish(None, error)
        self._seqs, self._cache = [], None


def _no_text(ids: list[int]) -> str:
    """Text of token ids for an engine without a processor (token ids only)."""
    return ""
