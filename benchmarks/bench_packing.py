"""Stream packing vs padded batches: effective (non-pad) tokens/s of forward+backward training steps on the
synthetic mix, same model, same samples, same process.

  packed: StreamPacker rows of --max-len tokens (block-diagonal attention via cu_seqlens, per-sample positions)
  padded: the same samples in loader order, batches of B right-padded to the longest, attention_mask

The packed rows are the first rows of a stream with records to spare (no drained tail); the padded batches
hold exactly the samples of those rows, in stream order. B defaults to round(max_len / mean sample length), so a padded batch carries about as many real tokens as a
packed row. Both contenders run one full pass over the same samples (same images through the ViT); effective
tokens/s = real tokens / seconds of that pass (best of the interleaved repeats).

On CPU, packed attention is one SDPA call over the whole row with a block-diagonal [N, N] mask, so its cost
grows with the row length rather than with the samples' own lengths (flash-attn's varlen kernel on GPU does
not have this cost). `--segment-attention` adds a what-if contender: the same packed rows with attention run
per segment (the LLM's attention function swapped for a per-segment loop during that contender only), i.e.
what a per-segment CPU path in sailvl/model/attention.py would give.

Run: .venv/bin/python benchmarks/bench_packing.py [--quick] [--bf16] [--model tiny|small] [--threads 1]
                                                  [--segment-attention]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import nullcontext
from itertools import islice, pairwise
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import compare, print_table  # noqa: E402
from sailvl.config import tiny_config  # noqa: E402
from sailvl.data.loader import MixtureLoader  # noqa: E402
from sailvl.data.packing import StreamPacker  # noqa: E402
from sailvl.data.processor import IGNORE_INDEX, Processor, ProcessorConfig  # noqa: E402
from sailvl.data.sources import JsonlSource  # noqa: E402
from sailvl.data.synth import generate  # noqa: E402
from sailvl.data.tokenizer import corpus_texts, train_bpe  # noqa: E402
from sailvl.model.vlm import SailVL  # noqa: E402

# "small": a wider LLM (Qwen3 benchmark "tiny" shape) on the tiny ViT, so LLM tokens dominate the step
LLM_SIZES = {"tiny": {}, "small": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
                                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64}}


def build(n: int, seed: int, video_frames: int, model_size: str, workdir: Path):
    generate(workdir, n, seed)
    jsonl = workdir / "train.jsonl"
    tok = train_bpe(corpus_texts([jsonl]), vocab_size=1024, out_dir=workdir / "tok")
    proc = Processor(tok, ProcessorConfig(image_size=64, patch_size=8, max_dynamic_patch=1, video_frames=video_frames))
    cfg = tiny_config(vocab_size=tok.get_vocab_size())
    for k, v in LLM_SIZES[model_size].items():
        setattr(cfg.llm_config, k, v)
    cfg.img_context_token_id = proc.img_context_id
    torch.manual_seed(0)
    model = SailVL(cfg).train()
    def make_loader():
        return MixtureLoader([(JsonlSource(jsonl), 1.0)], seed=seed, process=proc.encode_sample, epochs=1)
    return proc, model, make_loader


def padded_batches(items: list[dict], B: int, pad_id: int) -> list[dict]:
    out = []
    for i in range(0, len(items), B):
        group = items[i:i + B]
        L = max(len(it["input_ids"]) for it in group)
        ids = torch.full((len(group), L), pad_id, dtype=torch.long)
        labels = torch.full((len(group), L), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(group), L), dtype=torch.long)
        for r, it in enumerate(group):
            n = len(it["input_ids"])
            ids[r, :n], labels[r, :n], mask[r, :n] = it["input_ids"], it["labels"], 1
        pix = [it["pixel_values"] for it in group if it["pixel_values"] is not None]
        out.append({"input_ids": ids, "labels": labels, "attention_mask": mask,
                    "pixel_values": torch.cat(pix) if pix else None})
    return out


def pass_fn(model, batches, packed: bool, bf16: bool):
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext

    def run():
        for b in batches:
            model.zero_grad(set_to_none=True)
            with ctx():
                if packed:
                    loss = model(b.input_ids, pixel_values=b.pixel_values, labels=b.labels,
                                 position_ids=b.position_ids, cu_seqlens=b.cu_seqlens, max_seqlen=b.max_seqlen).loss
                else:
                    loss = model(b["input_ids"], pixel_values=b["pixel_values"], labels=b["labels"],
                                 attention_mask=b["attention_mask"]).loss
            loss.backward()
    return run


def segment_attention_fn(fn):
    """Run `fn` with the LLM's attention computed per packed segment (exactly the same maths)."""
    from sailvl.model import llm

    orig = llm.attention

    def per_segment(q, k, v, *, causal=True, cu_seqlens=None, max_seqlen=None, key_mask_BS=None):
        if cu_seqlens is None or key_mask_BS is not None or q.is_cuda or q.shape[0] != 1:
            return orig(q, k, v, causal=causal, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, key_mask_BS=key_mask_BS)
        cu = cu_seqlens.tolist()
        return torch.cat([torch.nn.functional.scaled_dot_product_attention(
            q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
            for s, e in pairwise(cu)], dim=2)

    def run():
        llm.attention = per_segment
        try:
            fn()
        finally:
            llm.attention = orig
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer samples and repeats")
    ap.add_argument("--bf16", action="store_true", help="also time bf16 autocast")
    ap.add_argument("--model", choices=sorted(LLM_SIZES), default="small")
    ap.add_argument("--n", type=int, default=None, help="samples (default 300, quick 120)")
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=None, help="padded batch size (default: max_len / mean length)")
    ap.add_argument("--buffer", type=int, default=64)
    ap.add_argument("--video-frames", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--segment-attention", action="store_true",
                    help="also time packed rows with per-segment attention (what-if, see the module doc)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 avoids OpenMP oversubscription "
                    "slowdowns when other processes share the cores)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.n or (120 if args.quick else 300)
    with tempfile.TemporaryDirectory() as d:
        # records to spare so that the rows below are steady-state rows (a full buffer behind each), not the
        # drained tail of a finite stream
        _, model, make_loader = build(n + args.buffer + 64, args.seed, args.video_frames, args.model, Path(d))
        t0 = time.perf_counter()
        packer = StreamPacker(make_loader(), max_len=args.max_len, buffer_size=args.buffer)
        packed = []
        for row in packer:
            packed.append(row)
            if packer.stats["samples"] >= n:
                break
        t_pack = time.perf_counter() - t0
        # the same samples, in stream order, for the padded batches
        used = {r for b in packed for r in b.refs}
        items = [it for ref, it in islice(make_loader().with_refs(), packer.stats["samples"] + args.buffer)
                 if ref in used]
    real = sum(len(it["input_ids"]) for it in items)
    mean_len = real / len(items)
    B = args.batch or max(1, round(args.max_len / mean_len))
    padded = padded_batches(items, B, pad_id=0)
    pad_slots = sum(b["input_ids"].numel() for b in padded)
    st = packer.stats
    assert st["tokens"] == real and st["samples"] == len(items)
    print(f"{len(items)} samples, {real} tokens (mean {mean_len:.0f}, max {max(len(i['input_ids']) for i in items)})"
          f"; packed: {len(packed)} rows of {args.max_len}; padded: {len(padded)} batches of {B}; "
          f"load+process+pack {packer.stats['samples'] / t_pack:,.0f} samples/s")
    rows = []
    for bf16 in (False, True) if args.bf16 else (False,):
        fns = {"padded": pass_fn(model, padded, False, bf16), "packed": pass_fn(model, packed, True, bf16)}
        if args.segment_attention:
            fns["segments"] = segment_attention_fn(fns["packed"])
        t = compare(fns, warmup=1, repeat=2 if args.quick else 3)
        prec = "bf16 autocast" if bf16 else "fp32"
        rows.append([prec, f"padded B={B}", 1 - real / pad_slots, real / t["padded"], 1.0])
        rows.append([prec, f"packed {args.max_len}", st["padding_fraction"], real / t["packed"],
                     t["padded"] / t["packed"]])
        if args.segment_attention:
            rows.append([prec, f"packed {args.max_len}, per-segment attention (what-if)", st["padding_fraction"],
                         real / t["segments"], t["padded"] / t["segments"]])
    print_table(f"fwd+bwd effective tokens/s, {args.model} model, {len(items)} synthetic samples",
                ["precision", "batching", "padding fraction", "effective tokens/s", "speed-up"], rows)


if __name__ == "__main__":
    main()
