"""What the runner asks for answers: a narrow interface, `generate(requests, settings, think)` -> one
`Completion` per request, with two implementations:

  - `LocalModel`: a SAIL-VL2 model directory run in-process (batched greedy decoding with a KV cache);
  - `EndpointModel`: any OpenAI-compatible server (our `sailvl serve`, vLLM, ...), requests sent
    concurrently, images as data URIs.

A request that cannot be run (a corrupt image, a prompt longer than the context, a 4xx from the server)
becomes a Completion with `error` set; an unreachable server raises EndpointError and stops the run.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .endpoint import ChatClient, openai_messages
from .tasks import GenerationSettings


@dataclass
class Request:
    prompt: str  # the user turn with <image> / <video> placeholders
    images: list[Any] = field(default_factory=list)
    video: Any = None
    history: list[dict] = field(default_factory=list)  # earlier turns [{"role", "content"}], placeholders inside

    @property
    def messages(self) -> list[dict]:
        return [*self.history, {"role": "user", "content": self.prompt}]


@dataclass
class Completion:
    text: str = ""
    error: str | None = None


class Backend(Protocol):
    name: str

    def generate(self, requests: list[Request], settings: GenerationSettings, think: bool) -> list[Completion]:
        ...


class LocalModel:
    """A SAIL-VL2 model directory (config.json + safetensors + tokenizer files)."""

    def __init__(self, path: str | Path, dtype=None, device=None):
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no model directory at {path} (expected config.json, safetensors weights "
                                    f"and tokenizer files)")
        from .. import load

        self.pipe = load(path, dtype=dtype, device=device)
        self.name = str(path.resolve())

    def generate(self, requests: list[Request], settings: GenerationSettings, think: bool) -> list[Completion]:
        from ..data.schema import SkipSample

        proc = self.pipe.processor
        out: list[Completion | None] = [None] * len(requests)
        inputs, rows = [], []
        for i, r in enumerate(requests):
            try:
                x = proc(r.messages, r.images, r.video, thinking=think, add_generation_prompt=True)
            except (SkipSample, ValueError, OSError) as e:
                out[i] = Completion(error=f"{type(e).__name__}: {e}")
                continue
            inputs.append(x)
            rows.append(i)
        if inputs:
            try:
                texts = self._generate(inputs, settings, think)
            except ValueError:  # e.g. one prompt too long for the context: run them one by one
                texts = []
                for x in inputs:
                    try:
                        texts.append(self._generate([x], settings, think)[0])
                    except ValueError as e:
                        texts.append(e)
            for i, t in zip(rows, texts):
                out[i] = Completion(error=f"ValueError: {t}") if isinstance(t, Exception) else Completion(text=t)
        return out

    def _generate(self, inputs: list[dict], settings: GenerationSettings, think: bool) -> list[str]:
        import torch

        from ..model.generate import GenerationConfig, generate

        model, proc = self.pipe.model, self.pipe.processor
        pixels = [x["pixel_values"] for x in inputs if x["pixel_values"] is not None]
        pixel_values = None
        if pixels:
            if isinstance(pixels[0], torch.Tensor):
                pixel_values = torch.cat(pixels).to(model.device, model.dtype)
            else:  # native resolution: one list of [3, H, W] images
                pixel_values = [p.to(model.device, model.dtype) for group in pixels for p in group]
        cfg = GenerationConfig(max_new_tokens=settings.budget(think), temperature=settings.temperature,
                               top_p=settings.top_p, seed=0 if settings.temperature > 0 else None,
                               stop_token_ids=[proc.im_end_id])
        def decode(ids):
            return proc.decode(ids, skip_special_tokens=False)

        with torch.no_grad():
            res = generate(model, [x["input_ids"].tolist() for x in inputs], cfg, pixel_values=pixel_values,
                           decode=decode)
        return res.texts


class EndpointModel:
    """An OpenAI-compatible server; `concurrency` requests are in flight at once."""

    def __init__(self, url: str, model: str, api_key: str | None = None, concurrency: int = 8,
                 timeout: float = 600.0, retries: int = 3):
        self.client = ChatClient(url, model, api_key=api_key, timeout=timeout, retries=retries)
        self.concurrency = max(1, concurrency)
        self.name = f"{model} @ {self.client.url}"

    def _one(self, r: Request, settings: GenerationSettings, think: bool) -> Completion:
        try:
            return Completion(text=self.client.complete(openai_messages(r.messages, r.images, r.video),
                                                        settings.budget(think), settings.temperature,
                                                        settings.top_p))
        except (ValueError, OSError) as e:
            return Completion(error=f"{type(e).__name__}: {e}")

    def generate(self, requests: list[Request], settings: GenerationSettings, think: bool) -> list[Completion]:
        if len(requests) == 1 or self.concurrency == 1:
            return [self._one(r, settings, think) for r in requests]
        with ThreadPoolExecutor(min(self.concurrency, len(requests))) as pool:
            return list(pool.map(lambda r: self._one(r, settings, think), requests))
