"""The one attention function every layer calls, and the static KV cache.

Letters: B batch, H query heads, G kv heads, L query length, S key length, K head dim, N packed tokens.

`attention` covers the three cases the model needs:
  - plain rows (optionally causal, optionally with a key padding mask for left-padded batches);
  - packed rows: `cu_seqlens` (cumulative sample lengths over the B*L tokens read row-major, samples never
    crossing a row end) gives block-diagonal attention so no sample sees another. On CUDA with flash-attn
    installed this uses its varlen kernel; on CPU (fp32, bf16) the samples are gathered into a few padded
    batches of similar length (`bucket_plan`, `_bucketed`), so the cost follows sum l_i^2, not B*L^2;
    otherwise each row gets an [L, L] block-diagonal mask;
  - decoding with a KV cache: S > L, query i sits at absolute position S - L + i.
"""

from __future__ import annotations

import bisect
import functools
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # optional GPU kernel
    from flash_attn import flash_attn_varlen_func  # type: ignore
except Exception:  # noqa: BLE001 - any import problem means "not available"
    flash_attn_varlen_func = None


# CPU packed attention in dtypes other than fp32 and bf16 (those go bucketed, below): one SDPA call per sample
# wins when samples are long (the block-diagonal mask wastes L^2 - sum l_i^2); with many short samples the
# per-call overhead loses to one masked call. Measured on the tiny recipe (rows of 512, samples of ~64 tokens:
# masked 1.4x faster) and in benchmarks/bench_packing.py (rows of 1024 with long samples: per-sample 1.3x).
PER_SEGMENT_MIN_MEAN_LEN = 256
# CPU bf16 training on short rows (the ViT's 64-256 patches, short padded batches): torch's flash kernel for
# CPU has a slow backward at these sizes; plain matmul -> softmax -> matmul is 2-4x faster up to L = 128 and
# slower beyond (measured fwd+bwd, 4,096 tokens per call: L=64 23.7 vs 6.5 ms, L=128 25.6 vs 10.9 ms,
# L=256 18.9 vs 23.3 ms). Same math; the softmax runs in fp32.
MATMUL_MAX_LEN = 128
# CPU packed attention, fp32 and bf16 (`_bucketed`): samples gathered by length into a few batches padded to a
# multiple of BUCKET_ALIGN (runs of sorted lengths chosen by `bucket_lengths`), attention per batch, outputs
# scattered back. Faster than both the masked call and per-sample SDPA in every case of
# benchmarks/bench_attention.py (1 thread, H=4 G=2 K=64; fp32 and bf16, fwd+bwd and forward only): bf16
# fwd+bwd on tiny recipe rows (4 x 512, samples of 30-150 tokens) 2.3x the masked call and 3.2x per-sample;
# rows of 1024 with samples of 200-1000 1.6x and 3.2x; fp32 fwd+bwd 1.6-6.8x the masked call. A batch of
# padded length P runs as matmul -> softmax -> matmul up to BUCKET_MATMUL_MAX_LEN (bf16: 1.2x faster than
# flash at P = 256, 1.1x slower at 320; fp32: even at 96, 1.05x slower at 128), beyond that with torch's flash
# kernel (which also keeps the [P, P] scores out of memory).
BUCKET_ALIGN = 16
BUCKET_MATMUL_MAX_LEN = {torch.bfloat16: 256, torch.float32: 96}
# Modelled fixed cost of one more batch, in units of (samples x P^2): about one 126-token sample. Plain
# rounding of every length to a multiple of 16 or 32 instead measured 5-10% slower on the tiny recipe (bf16).
BUCKET_OVERHEAD = 16_000


def segment_ids(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """Segment index of each of n packed tokens, from cumulative lengths [0, l0, l0+l1, ..., n]."""
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != n:
        raise ValueError(f"cu_seqlens must start at 0 and end at the packed length {n}, got {cu_seqlens.tolist()}")
    return torch.searchsorted(cu_seqlens[1:].to(torch.int64), torch.arange(n, device=cu_seqlens.device), right=True)


def check_row_bounds(bounds: list[int], B: int, L: int) -> None:
    """Raise unless cumulative lengths `bounds` cover B rows of L tokens with no sample crossing a row end."""
    if bounds[0] != 0 or bounds[-1] != B * L:
        raise ValueError(f"cu_seqlens must start at 0 and end at the packed length {B * L}, got {bounds}")
    if any(s // L != (e - 1) // L for s, e in zip(bounds[:-1], bounds[1:]) if e > s):
        raise ValueError("a packed sample crosses a row boundary")


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
            and q_BHLK.dtype in (torch.float32, torch.bfloat16)):
        return _bucketed(q_BHLK, k_BGSK, v_BGSK, cu_seqlens, causal)
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
    check_row_bounds(bounds, B, L)
    outs = [F.scaled_dot_product_attention(q[:, s:e], k[:, s:e], v[:, s:e], is_causal=causal and e - s > 1,
                                           enable_gqa=H != G)
            for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs, dim=1).view(H, B, L, K).transpose(0, 1)


@dataclass(frozen=True)
class BucketPlan:
    """Where the samples of packed rows go in the bucketed layout (see `bucket_plan`)."""
    buckets: tuple[tuple[int, int, bool], ...]  # (samples n, padded length P, flash?) per bucket, buffer order
    q_index: torch.Tensor  # [sum n*H*P] row of q viewed as [B*L*H, K] for each buffer row (buckets [n, H, P])
    kv_index: torch.Tensor  # [sum n*G*P] the same for k and v viewed as [B*L*G, K]
    out_index: torch.Tensor  # [B*L*H] buffer row of each (token, head): the inverse of q_index
    bias: tuple[torch.Tensor | None, ...]  # per bucket: additive mask (0 / -inf) for its scores, or None


def bucket_lengths(lengths: list[int]) -> list[int]:
    """Padded lengths (ascending) of the buckets for samples of these lengths. The sorted lengths, rounded up
    to BUCKET_ALIGN, are cut into runs, each padded to its longest, minimising the modelled cost
    sum over buckets of (BUCKET_OVERHEAD + n * P^2) (dynamic programming over the distinct rounded lengths)."""
    sizes = sorted(Counter(-(-n // BUCKET_ALIGN) * BUCKET_ALIGN for n in lengths).items())
    best = [(0, 0)]  # best[j] = (cost, start of the last run) for the first j distinct lengths
    for j, (P, _) in enumerate(sizes, 1):
        n, cands = 0, []
        for i in range(j - 1, -1, -1):
            n += sizes[i][1]
            cands.append((best[i][0] + BUCKET_OVERHEAD + n * P * P, i))
        best.append(min(cands))
    out, j = [], len(sizes)
    while j:
        out.append(sizes[j - 1][0])
        j = best[j][1]
    return out[::-1]


@functools.lru_cache(maxsize=16)
def bucket_plan(bounds: tuple[int, ...], B: int, L: int, H: int, G: int, causal: bool, dtype: torch.dtype,
                device: str) -> BucketPlan:
    """The bucketed layout of B packed rows of L tokens with cumulative sample lengths `bounds`. Memoised on
    the values (a few microseconds to look up), so the layers of a forward build it once."""
    check_row_bounds(list(bounds), B, L)
    segs = [(s, e - s) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    sizes = bucket_lengths([n for _, n in segs])
    groups: dict[int, list[tuple[int, int]]] = {P: [] for P in sizes}
    for s, n in segs:  # each sample into the shortest bucket it fits
        groups[sizes[bisect.bisect_left(sizes, n)]].append((s, n))
    out_index = torch.empty(B * L, H, dtype=torch.int64)
    q_index, kv_index, bias = [], [], []
    off = 0
    # causal matmul buckets add slices of one [P, P] mask to their scores (viewed as [n, G, H/G, P, P])
    P_mm = max([P for P in sizes if P <= BUCKET_MATMUL_MAX_LEN[dtype]], default=0)
    causal_bias = torch.full((P_mm, P_mm), float("-inf"), dtype=dtype).triu(1).to(device)
    # flash buckets pass is_causal instead: padding keys come after every real query of their sample
    for P, group in groups.items():
        start, length = torch.tensor(group).T
        pos = torch.arange(P)
        real = pos < length[:, None]  # [n, P]
        # padding slots read their sample's first token: finite values, masked out of every real query's keys
        tok = start[:, None] + torch.where(real, pos, 0)  # [n, P] packed token of each slot
        q_index.append((tok[:, None] * H + torch.arange(H)[:, None]).flatten())  # [n, H, P]
        kv_index.append((tok[:, None] * G + torch.arange(G)[:, None]).flatten())
        row = off + torch.arange(len(group))[:, None] * (H * P) + pos  # buffer row of head 0 of each slot
        out_index[tok[real]] = row[real][:, None] + torch.arange(H) * P
        off += len(group) * H * P
        if causal:
            bias.append(causal_bias[:P, :P] if P <= P_mm else None)
        elif not bool(real.all()):  # padding keys; a padding query still sees real keys, so no row is all -inf
            b = torch.zeros(len(group), 1, 1, P, dtype=dtype).masked_fill(~real[:, None, None], float("-inf"))
            bias.append(b.to(device))
        else:
            bias.append(None)
    return BucketPlan(tuple((len(g), P, P > P_mm) for P, g in groups.items()), torch.cat(q_index).to(device),
                      torch.cat(kv_index).to(device), out_index.flatten().to(device), tuple(bias))


def _bucketed(q_BHLK, k_BGLK, v_BGLK, cu_seqlens, causal: bool) -> torch.Tensor:
    """Packed attention on CPU: the samples gathered into a few padded batches of similar length (`bucket_plan`),
    attention per batch (matmul -> softmax -> matmul, or torch's flash kernel for long ones), the outputs
    scattered back to [B, H, L, K]."""
    B, H, L, K = q_BHLK.shape
    G = k_BGLK.shape[1]
    plan = bucket_plan(tuple(cu_seqlens.tolist()), B, L, H, G, causal, q_BHLK.dtype, str(q_BHLK.device))
    # one gather per tensor straight into the bucket-major layout [n, heads, P, K] that bmm wants (no
    # transposes); the softmax scale goes on k, the smaller of q and k under GQA
    rows = lambda t: t.transpose(1, 2).reshape(-1, K)  # noqa: E731  [B*L*heads, K], token-major
    q = rows(q_BHLK).index_select(0, plan.q_index)
    k = rows(k_BGLK).index_select(0, plan.kv_index) * K**-0.5
    v = rows(v_BGLK).index_select(0, plan.kv_index)
    outs = []
    # split, not slices: the backward of a split is one cat, that of each slice a zero-filled full buffer
    qs = q.split([n * H * P for n, P, _ in plan.buckets])
    ks, vs = (t.split([n * G * P for n, P, _ in plan.buckets]) for t in (k, v))
    for (n, P, flash), bias, qb, kb, vb in zip(plan.buckets, plan.bias, qs, ks, vs):
        qb, kb, vb = qb.view(n, H, P, K), kb.view(n, G, P, K), vb.view(n, G, P, K)
        if flash:  # k is scaled already
            o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=bias, is_causal=causal, scale=1.0,
                                               enable_gqa=H != G)
        else:
            s = qb.view(n, G, H // G * P, K) @ kb.transpose(-1, -2)  # GQA: a kv head's query heads stacked
            if bias is not None:  # in place: bmm's backward does not need its output, and add's is the identity
                s.view(n, G, H // G, P, P).add_(bias if causal else bias[:, :, None])
            # for bf16 torch's CPU softmax computes in fp32 and rounds the result, as _matmul_attention does
            o = torch.softmax(s, dim=-1) @ vb
        outs.append(o.reshape(-1, K))
    return torch.cat(outs).index_select(0, plan.out_index).view(B, L, H, K).transpose(1, 2)


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
