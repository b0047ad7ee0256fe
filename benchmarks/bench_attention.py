"""Packed (block-diagonal) attention on CPU: fwd+bwd ms per call of the three CPU paths of
sailvl/model/attention.py on the same packed rows, same process, interleaved.

  masked:      one SDPA call over [B, H, L, L] with the block-diagonal (+ causal) boolean mask
  per-segment: one SDPA call per sample (`_per_segment`)
  bucketed:    samples gathered into a few padded batches of similar length, attention per batch
               (`_bucketed`); what `attention` picks on CPU for packed rows in fp32 and bf16

The bucketed timings reuse the memoised plan (`bucket_plan`), as every layer after the first of a forward
does; the "plan ms" column is the one-off cost of building it (once per forward, per new packing).

Rows are packed first-fit from sample lengths drawn uniformly from a range (a draw that fits no row ends the
packing; what is left of a row is one padding segment, as StreamPacker makes it). Shapes default to the tiny
recipe's LLM: H=4 query heads, G=2 kv heads, head dim 64. `--forward` adds forward-only (no grad) timings.

Run: OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/bench_attention.py [--quick] [--forward]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import compare, print_table  # noqa: E402
from sailvl.model.attention import _bucketed, _per_segment, bucket_plan, build_mask  # noqa: E402

# (name, rows B, row length L, sample lengths lo..hi, causal)
CASES = [
    ("tiny recipe", 4, 512, (30, 150), True),
    ("tiny recipe, shorter", 4, 512, (10, 100), True),
    ("rows of 1024, short", 2, 1024, (30, 150), True),
    ("rows of 1024, long", 4, 1024, (200, 1000), True),
    ("rows of 1024, mixed", 4, 1024, (1, 1024), True),
    ("ViT-like, not causal", 1, 2048, (16, 256), False),
]


def packed_cu_seqlens(B: int, L: int, lo: int, hi: int, seed: int) -> torch.Tensor:
    rng = random.Random(seed)
    rows: list[list[int]] = [[] for _ in range(B)]
    while True:
        n = rng.randint(lo, hi)
        row = next((r for r in rows if sum(r) + n <= L), None)
        if row is None:
            break
        row.append(n)
    segs = [n for r in rows for n in r + ([L - sum(r)] if sum(r) < L else [])]
    return torch.tensor([0, *torch.tensor(segs).cumsum(0).tolist()], dtype=torch.int32)


def masked(q, k, v, cu_seqlens, causal):
    B, H, L, _ = q.shape
    mask = build_mask(L, L, causal=causal, cu_seqlens=cu_seqlens, key_mask_BS=None, device=q.device, B=B)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=H != k.shape[1])


PATHS = {"masked": masked, "per-segment": _per_segment, "bucketed": _bucketed}


def plan_ms(cu_seqlens, qkv, causal) -> float:
    (B, H, L, _), G = qkv[0].shape, qkv[1].shape[1]
    best = float("inf")
    for _ in range(5):
        bucket_plan.cache_clear()
        t0 = time.perf_counter()
        bucket_plan(tuple(cu_seqlens.tolist()), B, L, H, G, causal, qkv[0].dtype, "cpu")
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def call_fn(fn, qkv, cu_seqlens, causal, backward: bool):
    grad_out = torch.randn_like(qkv[0])

    def run():
        with nullcontext() if backward else torch.no_grad():
            q, k, v = (t.detach().requires_grad_(backward) for t in qkv)
            out = fn(q, k, v, cu_seqlens, causal)
            if backward:
                out.backward(grad_out)
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repeats, one seed")
    ap.add_argument("--forward", action="store_true", help="also time forward only (no grad)")
    ap.add_argument("--seeds", type=int, default=None, help="packings per case (default 3, quick 1)")
    ap.add_argument("--heads", type=int, nargs=3, default=(4, 2, 64), metavar=("H", "G", "K"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    H, G, K = args.heads
    seeds = args.seeds or (1 if args.quick else 3)
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for backward in (True, False) if args.forward else (True,):
            for name, B, L, (lo, hi), causal in CASES:
                total = dict.fromkeys(PATHS, 0.0)
                n_segs, plan = 0, 0.0
                for seed in range(seeds):
                    cu = packed_cu_seqlens(B, L, lo, hi, seed)
                    n_segs += len(cu) - 1
                    qkv = [torch.randn(B, L, h, K, dtype=dtype).transpose(1, 2) for h in (H, G, G)]
                    t = compare({p: call_fn(fn, qkv, cu, causal, backward) for p, fn in PATHS.items()},
                                warmup=1, repeat=3 if args.quick else 7)
                    for p in PATHS:
                        total[p] += t[p] * 1e3 / seeds
                    plan += plan_ms(cu, qkv, causal) / seeds
                rows.append([str(dtype).removeprefix("torch."), "fwd+bwd" if backward else "fwd",
                             f"{name}: {B}x{L}, lengths {lo}-{hi}", f"{n_segs / seeds:.0f}",
                             *total.values(), total["masked"] / total["bucketed"],
                             total["per-segment"] / total["bucketed"], plan])
    print_table(f"CPU packed attention, ms per call (mean over {seeds} packings), H={H} G={G} K={K}",
                ["dtype", "pass", "rows", "segments", "masked ms", "per-segment ms", "bucketed ms",
                 "masked / bucketed", "per-segment / bucketed", "plan ms"], rows)


if __name__ == "__main__":
    main()
