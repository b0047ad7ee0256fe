"""The one attention function every layer calls, and the static KV cache.

Letters: B batch, H query heads, G kv heads, L query length, S key length, K head dim, N packed tokens.

`attention` covers the three cases the model needs:
  - plain rows (optionally causal, optionally with a key padding mask for left-padded batches);
  - packed rows: `cu_seqlens` (cumulative sample lengths over the B*L tokens read row-major, samples never
    crossing a row end) gives block-diagonal attention so no sample sees another; each row's mask is
    [L, L], so several rows cost B*L^2, not (B*L)^2. On CUDA with flash-attn installed this uses its
    varlen kernel;
  - decoding with a KV cache: S > L, query i sits at absolute position S - L + i.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional GPU kernel
    from flash_attn import flash_attn_varlen_func  # type: ignore
except Exception:  # noqa: BLE001 - any import problem means "not available"
    flash_attn_varlen_func = None


# CPU packed attention: one SDPA call per sample wins when samples are long (the block-diagonal mask wastes
# L^2 - sum l_i^2); with many short samples the per-call overhead loses to one masked call. Measured on the
# tiny recipe (rows of 512, samples of ~64 tokens: masked 1.4x faster) and in benchmarks/bench_packing.py
# (rows of 1024 with long samples: per-sample 1.3x faster).
PER_SEGMENT_MIN_MEAN_LEN = 256
# CPU bf16 training on short rows (the ViT's 64-256 patches, short padded batches): torch's flash kernel for
# CPU has a slow backward at these sizes; plain matmul -> softmax -> matmul is 2-4x faster up to L = 128 and
# slower beyond (measured fwd+bwd, 4,096 tokens per call: L=64 23.7 vs 6.5 ms, L=128 25.6 vs 10.9 ms,
# L=256 18.9 vs 23.3 ms). Same math; the softmax runs in fp32.
MATMUL_MAX_LEN = 128


def segment_ids(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """Segment index of each of n packed tokens, from cumulative lengths [0, l0, l0+l1, ..., n]."""
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != n:
        raise ValueError(f"cu_seqlens must start at 0 and end at the packed length {n}, got {cu_seqlens.tolist()}")
    return torch.searchsorted(cu_seqlens[1:].to(torch.int64), torch.arange(n, device=cu_seqlens.device), right=True)


def build_mask(
    L: int, S: int, *, causal: bool, cu_seqlens: torch.Tensor | None, key_mask_BS: torch.Tensor | None, device,
    B: int = 1,
) -> torch.Tensor | None:
    """Boolean mask (True = may attend) broadcastable to [B, H, L, S], or None when no masking is needed."""
    mask = None
    q_pos = torch.arange(L, device=device) + (S - L)
    k_pos = torch.arange(S, device=device)
    if causal and (L > 1 or key_mask_BS is not None or cu_seqlens is not None):
        mask = k_pos[None, :] <= q_pos[:, None]
    if cu_seqlens is not None:
        if L != S:
            raise ValueError("packed attention (cu_seqlens) cannot be combined with a KV cache")
        seg = segment_ids(cu_seqlens, B * S).view(B, S)
        if B > 1 and bool((seg[1:, 0] == seg[:-1, -1]).any()):
            raise ValueError("a packed sample crosses a row boundary")
        same = (seg[:, :, None] == seg[:, None, :])[:, None]  # [B, 1, L, L]
        mask = same if mask is None else mask & same
    if key_mask_BS is not None:
        km = key_mask_BS[:, None, None, :].bool()
        mask = km if mask is None else mask[None, None] & km
        # A query at a padded position would otherwise see no key at all (NaN); let it see itself.
        mask = mask | (k_pos[None, :] == q_pos[:, None])
    return mask


def attention(
    q_BHLK: torch.Tensor,
    k_BGSK: torch.Tensor,
    v_BGSK: torch.Tensor,
    *,
    causal: bool = True,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    key_mask_BS: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention with GQA. Returns [B, H, L, K]."""
    B, H, L, K = q_BHLK.shape
    S = k_BGSK.shape[2]
    if (
        cu_seqlens is not None
        and flash_attn_varlen_func is not None
        and q_BHLK.is_cuda
        and q_BHLK.dtype in (torch.float16, torch.bfloat16)
        and key_mask_BS is None
    ):
        cu = cu_seqlens.to(torch.int32)
        max_len = max_seqlen if max_seqlen is not None else int((cu[1:] - cu[:-1]).max())
        flat = lambda t: t.transpose(1, 2).reshape(B * L, t.shape[1], K)  # noqa: E731  [B*L, heads, K]
        out_NHK = flash_attn_varlen_func(flat(q_BHLK), flat(k_BGSK), flat(v_BGSK), cu, cu, max_len, max_len,
                                         causal=causal)
        return out_NHK.view(B, L, H, K).transpose(1, 2)
    if (cu_seqlens is not None and key_mask_BS is None and not q_BHLK.is_cuda and L == S
            and B * L >= PER_SEGMENT_MIN_MEAN_LEN * (len(cu_seqlens) - 1)):
        return _per_segment(q_BHLK, k_BGSK, v_BGSK, cu_seqlens, causal)
    if (cu_seqlens is None and key_mask_BS is None and L == S and L <= MATMUL_MAX_LEN and not q_BHLK.is_cuda
            and q_BHLK.dtype == torch.bfloat16 and torch.is_grad_enabled() and q_BHLK.requires_grad):
        return _matmul_attention(q_BHLK, k_BGSK, v_BGSK, causal)
    mask = build_mask(L, S, causal=causal, cu_seqlens=cu_seqlens, key_mask_BS=key_mask_BS, device=q_BHLK.device,
                      B=B)
    is_causal = causal and mask is None and L == S and L > 1
    return F.scaled_dot_product_attention(
        q_BHLK, k_BGSK, v_BGSK, attn_mask=mask, is_causal=is_causal, enable_gqa=H != k_BGSK.shape[1]
    )


def _matmul_attention(q_BHLK, k_BGLK, v_BGLK, causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(K)) v with explicit matmuls (GQA by repeating kv heads); softmax in fp32."""
    H, G, L, K = q_BHLK.shape[1], k_BGLK.shape[1], q_BHLK.shape[2], q_BHLK.shape[3]
    if H != G:
        k_BGLK, v_BGLK = k_BGLK.repeat_interleave(H // G, dim=1), v_BGLK.repeat_interleave(H // G, dim=1)
    s_BHLL = (q_BHLK @ k_BGLK.transpose(-1, -2)).float() * K**-0.5
    if causal and L > 1:
        s_BHLL = s_BHLL.masked_fill(torch.ones(L, L, dtype=torch.bool, device=s_BHLL.device).triu(1), float("-inf"))
    return torch.softmax(s_BHLL, dim=-1).to(v_BGLK.dtype) @ v_BGLK


def _per_segment(q_BHLK, k_BGLK, v_BGLK, cu_seqlens, causal: bool) -> torch.Tensor:
    """Packed attention on CPU as one SDPA call per sample: the cost follows the samples' own lengths
    (sum of l_i^2) instead of the row length (L^2), and no mask tensor is built."""
    B, H, L, K = q_BHLK.shape
    G = k_BGLK.shape[1]
    flat = lambda t: t.transpose(0, 1).reshape(t.shape[1], B * L, K)  # noqa: E731  [heads, B*L, K]
    q, k, v = flat(q_BHLK), flat(k_BGLK), flat(v_BGLK)
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != B * L:
        raise ValueError(f"cu_seqlens must start at 0 and end at the packed length {B * L}, got {bounds}")
    rows = [b // L for b in bounds[:-1]]
    ends = [(e - 1) // L for e in bounds[1:]]
    if rows != ends:
        raise ValueError("a packed sample crosses a row boundary")
    outs = [F.scaled_dot_product_attention(q[:, s:e], k[:, s:e], v[:, s:e], is_causal=causal and e - s > 1,
                                           enable_gqa=H != G)
            for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs, dim=1).view(H, B, L, K).transpose(0, 1)


class KVCache:
    """Preallocated per-layer key/value buffers [B, G, max_len, K] with one shared fill length.

    `key_mask_BS` (True = real token) marks left padding of batched prompts; it covers the whole buffer.
    """

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0
        self.key_mask_BS: torch.Tensor | None = None

    def update(self, layer: int, k_BGLK: torch.Tensor, v_BGLK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        L = k_BGLK.shape[2]
        end = self.length + L
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > capacity {self.max_len}")
        self.k[layer, :, :, self.length:end] = k_BGLK
        self.v[layer, :, :, self.length:end] = v_BGLK
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def current_key_mask(self, extra: int) -> torch.Tensor | None:
        """Key mask for the next forward of `extra` tokens (None when there is no padding)."""
        if self.key_mask_BS is None:
            return None
        return self.key_mask_BS[:, : self.length + extra]
