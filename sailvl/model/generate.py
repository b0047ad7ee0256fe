"""Generation with a KV cache: greedy and sampling (temperature, top-k, top-p, per-request seed), stop
token ids and stop strings, max new tokens, and batches of prompts of different lengths (left padding
with a key mask, per-row positions, so each row decodes exactly as it would alone).

Letters: B batch, P padded prompt length, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k filter
    seed: int | None = None
    stop_token_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = ()

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # new tokens per prompt, without the stop token id
    finish_reasons: list[str]  # "stop" or "length"
    texts: list[str] | None = None  # when a decode function was given; cut before a stop string
    logits: list[torch.Tensor] = field(default_factory=list)  # per step [B, V], when asked


def filter_logits(logits_BV: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask (to -inf) everything outside the top-k and the top-p nucleus; the best token always stays."""
    if top_k > 0 and top_k < logits_BV.shape[-1]:
        kth = torch.topk(logits_BV, top_k, dim=-1).values[..., -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits_BV, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits_BV = logits_BV.masked_fill(drop, float("-inf"))
    return logits_BV


def sample(logits_V: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> int:
    if cfg.temperature == 0:
        return int(logits_V.argmax())
    logits = filter_logits((logits_V.float() / cfg.temperature)[None], cfg.top_k, cfg.top_p)[0]
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))


def _stop_cut(text: str, stops: Sequence[str]) -> int | None:
    cuts = [text.find(s) for s in stops if s and s in text]
    return min(cuts) if cuts else None


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    cfg: GenerationConfig | None = None,
    *,
    pixel_values=None,
    image_embeds: torch.Tensor | None = None,
    decode: Callable[[list[int]], str] | None = None,
    on_token: Callable[[int, int], None] | None = None,
    pad_id: int = 0,
    return_logits: bool = False,
) -> GenerationOutput:
    """Generate for a batch of token-id prompts (images, if any, in prompt order)."""
    cfg = cfg or GenerationConfig()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if cfg.stop_strings and decode is None:
        raise ValueError("stop_strings need a decode function")
    device = model.device
    B, P = len(prompts), max(len(p) for p in prompts)
    max_ctx = model.config.llm_config.max_position_embeddings
    if P + cfg.max_new_tokens > max_ctx:
        raise ValueError(f"prompt ({P}) + max_new_tokens ({cfg.max_new_tokens}) exceeds the context {max_ctx}")
    ids = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(B, P + cfg.max_new_tokens, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.as_tensor(list(p), device=device)
        mask[i, P - len(p):] = True
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    cache = model.language_model.new_cache(B, P + cfg.max_new_tokens)
    cache.key_mask_BS = mask
    positions = (mask[:, :P].long().cumsum(-1) - 1).clamp_min(0)
    gens = None
    if cfg.seed is not None:
        gens = [torch.Generator(device=device).manual_seed(cfg.seed) for _ in range(B)]
    out = GenerationOutput(tokens=[[] for _ in range(B)], finish_reasons=["length"] * B)
    done = [cfg.max_new_tokens == 0] * B
    stops = set(cfg.stop_token_ids)
    logits_BV = None
    if cfg.max_new_tokens:
        logits_BV = model(ids, pixel_values=pixel_values, image_embeds=image_embeds, position_ids=positions,
                          cache=cache, logits_to_keep=1).logits[:, -1]
    for step in range(cfg.max_new_tokens):
        if return_logits:
            out.logits.append(logits_BV.float().cpu())
        nxt = torch.full((B, 1), pad_id, dtype=torch.long, device=device)
        greedy = logits_BV.argmax(-1).tolist() if cfg.temperature == 0 else None
        for i in range(B):
            if done[i]:
                continue
            tok = greedy[i] if greedy is not None else sample(logits_BV[i], cfg, gens[i] if gens else None)
            if tok in stops:
                done[i], out.finish_reasons[i] = True, "stop"
                continue
            out.tokens[i].append(tok)
            nxt[i, 0] = tok
            if on_token is not None:
                on_token(i, tok)
            if cfg.stop_strings and _stop_cut(decode(out.tokens[i]), cfg.stop_strings) is not None:
                done[i], out.finish_reasons[i] = True, "stop"
        if all(done) or step == cfg.max_new_tokens - 1:
            break
        pos = (lengths + step)[:, None]
        logits_BV = model(nxt, position_ids=pos, cache=cache).logits[:, -1]
    if decode is not None:
        out.texts = []
        for toks in out.tokens:
            text = decode(toks)
            cut = _stop_cut(text, cfg.stop_strings)
            out.texts.append(text if cut is None else text[:cut])
    return out
