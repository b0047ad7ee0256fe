"""Per-request sampling settings and the per-step work on logits the engine does for a batch whose rows
all have their own settings: next tokens (greedy rows in one argmax, sampled rows each with their own
torch.Generator, exactly as `sailvl.model.generate` samples), log-probabilities, and incremental
detokenization that never streams a stop string or half a UTF-8 character.

Letters: B batch rows, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..model.generate import GenerationConfig, sample

MAX_TOP_LOGPROBS = 20  # OpenAI's limit


@dataclass
class SamplingParams:
    """What one request asks of the engine. `max_new_tokens=None` means the engine's default (1024, or 4096
    in thinking mode), capped by what the context leaves after the prompt."""

    max_new_tokens: int | None = None
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k filter
    seed: int | None = None  # choice i of a request samples with seed + i
    stop: Sequence[str] = ()  # stop strings: the text ends before the first one
    stop_token_ids: Sequence[int] = ()  # extra stop ids (the tokenizer's <|im_end|> always stops)
    ignore_eos: bool = False  # do not stop at <|im_end|> (benchmarks: fixed-length outputs)
    n: int = 1  # independent choices from one prefill
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self):
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=True")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        self.generation_config()  # validates temperature, top_p, top_k

    def generation_config(self) -> GenerationConfig:
        """The same settings as a `GenerationConfig`, so a row samples exactly as `generate` would."""
        return GenerationConfig(max_new_tokens=0, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                                seed=self.seed)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


def next_tokens(logits_BV: torch.Tensor, configs: Sequence[GenerationConfig],
                generators: Sequence[torch.Generator | None]) -> list[int]:
    """One token per row: argmax for greedy rows (one call for all of them), `generate.sample` otherwise."""
    greedy = logits_BV.argmax(-1).tolist() if any(c.temperature == 0 for c in configs) else None
    return [greedy[i] if c.temperature == 0 else sample(logits_BV[i], c, generators[i])
            for i, c in enumerate(configs)]


def token_logprobs(logits_BV: torch.Tensor, tokens: Sequence[int], top_k: Sequence[int]) -> list[TokenLogprob]:
    """Log-probabilities (of the model's distribution, before temperature and filters) of the chosen tokens,
    with each row's `top_k[i]` best alternatives."""
    logp_BV = torch.log_softmax(logits_BV.float(), dim=-1)
    chosen = logp_BV.gather(-1, torch.tensor(tokens, device=logits_BV.device)[:, None])[:, 0].tolist()
    k = max(top_k, default=0)
    top_vals, top_ids = (logp_BV.topk(k, dim=-1) if k else (None, None))
    out = []
    for i, tok in enumerate(tokens):
        top = []
        if top_k[i]:
            top = list(zip(top_ids[i, :top_k[i]].tolist(), top_vals[i, :top_k[i]].tolist()))
        out.append(TokenLogprob(tok, chosen[i], top))
    return out


class TextStream:
    """Token ids -> text deltas. A token's text is released only once it is complete (no trailing U+FFFD
    from a split UTF-8 character) and cannot be the start of a stop string; the text ends right before the
    first stop string. Decoding looks at a short window of recent tokens (as vLLM does), so each step costs
    O(1) instead of re-decoding everything."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()):
        self.decode, self.stops = decode, [s for s in stops if s]
        self.ids: list[int] = []
        self.text = ""  # decoded so far (cut at a stop string once one is found)
        self.sent = 0  # characters of self.text already released
        self.stopped = False
        self._prefix, self._read = 0, 0  # token window: [prefix, read) already in self.text

    def add(self, token_id: int) -> str:
        """Append a token; returns the newly releasable text (may be empty). Sets `stopped` on a stop string."""
        assert not self.stopped, "tokens after a stop string"
        self.ids.append(token_id)
        before = self.decode(self.ids[self._prefix:self._read])
        now = self.decode(self.ids[self._prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            checked = len(self.text)
            self.text += now[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
            self._check_stops(checked)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text (an incomplete character included, as a full decode would show it)."""
        if not self.stopped and self._read < len(self.ids):
            before = self.decode(self.ids[self._prefix:self._read])
            checked = len(self.text)
            self.text += self.decode(self.ids[self._prefix:])[len(before):]
            self._read = len(self.ids)
            self._check_stops(checked)
        return self._release(final=True)

    def _check_stops(self, checked: int) -> None:
        if not self.stops:
            return
        start = max(0, checked - max(len(s) for s in self.stops) + 1)
        cuts = [i for i in (self.text.find(s, start) for s in self.stops) if i != -1]
        if cuts:
            self.text, self.stopped = self.text[:min(cuts)], True

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if not final and not self.stopped:
            end -= self._held_back()
        delta = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best
