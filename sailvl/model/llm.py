"""Qwen3 / Qwen3-MoE decoder: GQA with per-head q/k RMSNorm, RoPE, SwiGLU (or sparse MoE), RMSNorm,
tied or untied head. Module names follow transformers' Qwen3 (`model.layers.{i}.self_attn.q_proj`, ...).

Letters: B batch, L length, D hidden, H q heads, G kv heads, K head dim, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import LLMConfig
from .attention import KVCache, attention, segment_ids
from .moe import SparseMoeBlock
from .norm import RMSNorm, autocast_dtype_for
from .rope import norm_rope, rope_tables


class SelfAttention(nn.Module):
    def __init__(self, cfg: LLMConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.H, self.G, self.K = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.H * self.K, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.G * self.K, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.G * self.K, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.H * self.K, cfg.hidden_size, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(self.K, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.K, cfg.rms_norm_eps)
        # training with attention supervision (sailvl.train.focus): keep this call's (q [B,H,L,K], k [B,G,S,K])
        self.keep_qk = False
        self.qk: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x_BLD, rope, cu_seqlens=None, max_seqlen=None, key_mask_BS=None, cache: KVCache | None = None):
        """`rope`: the `rope_tables` (cos, sin) [B, L, K/2] of the positions."""
        B, L, _ = x_BLD.shape
        dtype = autocast_dtype_for(x_BLD)  # under autocast: written directly in the dtype attention runs in
        q = norm_rope(self.q_proj(x_BLD).view(B, L, self.H, self.K), self.q_norm.weight, self.q_norm.eps, *rope, dtype)
        k = norm_rope(self.k_proj(x_BLD).view(B, L, self.G, self.K), self.k_norm.weight, self.k_norm.eps, *rope, dtype)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x_BLD).view(B, L, self.G, self.K).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        self.qk = (q, k) if self.keep_qk else None
        out_BHLK = attention(q, k, v, causal=True, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, key_mask_BS=key_mask_BS)
        return self.o_proj(out_BHLK.transpose(1, 2).reshape(B, L, self.H * self.K))


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, layer: int):
        super().__init__()
        self.is_sparse = cfg.is_sparse_layer(layer)
        # under autocast the norms feeding Linear layers emit bf16 themselves (one cast instead of one per Linear);
        # the MoE block's router and experts take the norm's own dtype, so its norm keeps it
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, autocast_output=True)
        self.self_attn = SelfAttention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, autocast_output=not self.is_sparse)
        self.mlp = SparseMoeBlock(cfg) if self.is_sparse else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, rope, cu_seqlens=None, max_seqlen=None, key_mask_BS=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, cu_seqlens, max_seqlen, key_mask_BS, cache)
        h = self.post_attention_layernorm(x)
        if self.is_sparse:
            h, router_logits = self.mlp(h)
            return x + h, router_logits
        return x + self.mlp(h), None


class Qwen3Model(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class LMOutput:
    logits: torch.Tensor | None
    hidden: torch.Tensor
    router_logits: list[torch.Tensor] = field(default_factory=list)


def packed_positions(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """Positions that restart at 0 for every packed sample (over n row-major tokens)."""
    seg = segment_ids(cu_seqlens, n)
    return torch.arange(n, device=cu_seqlens.device) - cu_seqlens.to(torch.int64)[seg]


class Qwen3ForCausalLM(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.grad_ckpt = False  # activation checkpointing per decoder layer (training only)
        self.model = Qwen3Model(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.cfg.tie_word_embeddings else self.lm_head.weight

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        key_mask_BS: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int | None = None,
        compute_logits: bool = True,
    ) -> LMOutput:
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, L, _ = x.shape
        if position_ids is None:
            if cu_seqlens is not None:
                position_ids = packed_positions(cu_seqlens, B * L).view(B, L)
            else:
                start = cache.length if cache is not None else 0
                position_ids = torch.arange(start, start + L, device=x.device)[None].expand(B, L)
        rope = rope_tables(position_ids, self.cfg.head_dim, self.cfg.rope_theta)
        if cache is not None and key_mask_BS is None:
            key_mask_BS = cache.current_key_mask(L)
        router_logits = []
        ckpt = self.grad_ckpt and cache is None and torch.is_grad_enabled()
        for layer in self.model.layers:
            if ckpt:
                x, r = checkpoint(layer, x, rope, cu_seqlens, max_seqlen, key_mask_BS, None, use_reentrant=False)
            else:
                x, r = layer(x, rope, cu_seqlens, max_seqlen, key_mask_BS, cache)
            if r is not None:
                router_logits.append(r)
        if cache is not None:
            cache.advance(L)
        x = self.model.norm(x)
        logits = None
        if compute_logits:
            h = x if logits_to_keep is None else x[:, -logits_to_keep:]
            logits = F.linear(h, self.head_weight)
        return LMOutput(logits=logits, hidden=x, router_logits=router_logits)

    def new_cache(self, batch: int, max_len: int, dtype=None, device=None) -> KVCache:
        w = self.model.embed_tokens.weight
        return KVCache(self.cfg.num_hidden_layers, batch, self.cfg.num_key_value_heads, max_len, self.cfg.head_dim,
                       dtype or w.dtype, device or w.device)
