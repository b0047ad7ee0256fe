"""The CPU training step of the tiny recipe, piece by piece: sailvl's RMSNorm / q-k norm + RoPE / layers / whole
step against the previous implementations (kept below as the reference), same weights, same process.

Shape: `sailvl.recipes.tiny.tiny_model()` (ViT 128 x 4 on 64 px patch-8 images, LLM 256 x 4, 4 q / 2 kv heads of
64, intermediate 768, vocab 1024), fp32 weights under bf16 autocast, one step = 4 packed rows of 512 tokens
(samples of 60 tokens, each with a 16-token image: 36 images), next-token loss at the labelled positions as the
trainer computes it (`labelled_token_losses`), backward, AdamW.

Reference (the code before this change): RMSNorm as pow -> mean -> rsqrt -> mul -> cast -> mul in autograd, its
fp32 output cast to bf16 again by every autocast Linear that reads it; RoPE as rotate-half (neg + cat) with full
[B, L, K] cos/sin tables, applied after the per-head q/k RMSNorm, the fp32 result cast to bf16 by attention.
The reference contender runs the same modules with those forwards patched in.

Times are medians of the thread's CPU time (time.thread_time) over interleaved runs: on a shared machine the wall
clock also counts the time other processes hold the core. Pin it: `OMP_NUM_THREADS=1 taskset -c 1`.

`--compile` also times torch.compile (inductor): one decoder layer and one ViT block (static shapes), then the
whole step with every layer and block compiled (dynamic shapes): compile seconds (cold: an empty inductor cache)
and steady state against eager.
A what-if table (not applied) times the trainer's CPU AdamW (per-parameter loop) against fused=True.

Run: OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/bench_step.py [--quick] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import print_table  # noqa: E402
from sailvl.model import llm, norm  # noqa: E402
from sailvl.model.attention import KVCache, attention  # noqa: E402
from sailvl.model.rope import norm_rope, rope_tables  # noqa: E402
from sailvl.model.vlm import SailVL  # noqa: E402
from sailvl.recipes.tiny import tiny_model  # noqa: E402

AC = torch.bfloat16
IMG_CTX = 1001


# ------------------------------------------------------------------------------------ the reference code
def ref_rmsnorm_forward(self, x: torch.Tensor) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
    return self.weight * x32.to(dtype)


def ref_rope_cos_sin(pos_BL, dim, theta, dtype):
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=pos_BL.device).float() / dim))
    freqs_BLk = pos_BL.float()[..., None] * inv
    emb_BLK = torch.cat([freqs_BLk, freqs_BLk], dim=-1)
    return emb_BLK.cos().to(dtype), emb_BLK.sin().to(dtype)


def ref_rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def ref_apply_rope(x_BHLK, cos_BLK, sin_BLK):
    cos, sin = cos_BLK[:, None], sin_BLK[:, None]
    return x_BHLK * cos + ref_rotate_half(x_BHLK) * sin


def ref_attn_forward(self, x_BLD, rope, cu_seqlens=None, max_seqlen=None, key_mask_BS=None,
                     cache: KVCache | None = None):
    B, L, _ = x_BLD.shape
    q = self.q_norm(self.q_proj(x_BLD).view(B, L, self.H, self.K)).transpose(1, 2)
    k = self.k_norm(self.k_proj(x_BLD).view(B, L, self.G, self.K)).transpose(1, 2)
    v = self.v_proj(x_BLD).view(B, L, self.G, self.K).transpose(1, 2)
    q, k = ref_apply_rope(q, *rope), ref_apply_rope(k, *rope)
    if cache is not None:
        k, v = cache.update(self.layer, k, v)
    out_BHLK = attention(q, k, v, causal=True, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, key_mask_BS=key_mask_BS)
    return self.o_proj(out_BHLK.transpose(1, 2).reshape(B, L, self.H * self.K))


@contextmanager
def reference_impl():
    """Run sailvl's modules with the reference forwards (fp32 weights: the old tables took the embeddings' dtype)."""
    saved = (norm.RMSNorm.forward, llm.SelfAttention.forward, llm.rope_tables)
    norm.RMSNorm.forward = ref_rmsnorm_forward
    llm.SelfAttention.forward = ref_attn_forward
    llm.rope_tables = lambda pos, dim, theta: ref_rope_cos_sin(pos, dim, theta, torch.float32)
    try:
        yield
    finally:
        norm.RMSNorm.forward, llm.SelfAttention.forward, llm.rope_tables = saved


def in_ref(fn):
    def run():
        with reference_impl():
            fn()
    return run


# ------------------------------------------------------------------------------------------- harness
def compare_cpu(fns: dict, warmup: int, repeat: int) -> dict[str, float]:
    """Median thread-CPU milliseconds per function, runs interleaved (A B A B ...)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.thread_time()
            fn()
            times[name].append(time.thread_time() - t0)
    return {name: 1e3 * sorted(t)[len(t) // 2] for name, t in times.items()}


def make_batch(rows=4, row_len=512, sample_len=60, img_tokens=16, seed=0):
    """Packed rows of `sample_len`-token samples (the last one of a row shorter), each starting with an image."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (rows, row_len), generator=g)
    labels = ids.clone()
    pos = torch.zeros(rows, row_len, dtype=torch.long)
    cu, n_img = [0], 0
    for r in range(rows):
        for s in range(0, row_len, sample_len):
            e = min(row_len, s + sample_len)
            if e - s > img_tokens + 4:
                ids[r, s + 1:s + 1 + img_tokens] = IMG_CTX
                labels[r, s:s + 1 + img_tokens] = -100
                n_img += 1
            pos[r, s:e] = torch.arange(e - s)
            cu.append(r * row_len + e)
    return dict(input_ids=ids, labels=labels, position_ids=pos, cu_seqlens=torch.tensor(cu, dtype=torch.int32),
                max_seqlen=sample_len, pixel_values=torch.randn(n_img, 3, 64, 64, generator=g))


def build_model() -> SailVL:
    torch.manual_seed(0)
    cfg = tiny_model()
    cfg.img_context_token_id = IMG_CTX
    return SailVL(cfg).train()


def step_fn(model: SailVL, batch: dict):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with torch.autocast("cpu", dtype=AC):
            out = model(batch["input_ids"], pixel_values=batch["pixel_values"], position_ids=batch["position_ids"],
                        cu_seqlens=batch["cu_seqlens"], max_seqlen=batch["max_seqlen"], compute_logits=False)
            ce, valid = model.labelled_token_losses(out.hidden, batch["labels"], batch["cu_seqlens"])
            loss = ce.sum() / valid.sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def fwd_bwd(module_call, inputs: list[torch.Tensor], params: list[torch.Tensor]):
    """fwd+bwd of module_call(*inputs) under autocast, backward of a fixed random cotangent."""
    cot = {}

    def run():
        xs = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
        with torch.autocast("cpu", dtype=AC):
            outs = module_call(*xs)
        outs = outs if isinstance(outs, (tuple, list)) else [outs]
        if not cot:
            cot["g"] = [torch.randn_like(o) for o in outs]
        torch.autograd.backward(list(outs), cot["g"])
        for p in params:
            p.grad = None
    return run


def component_fns(model: SailVL, batch: dict, n_img: int):
    """name -> (reference fn, new fn) of the per-component fwd+bwd timings."""
    lm = model.language_model
    layer = lm.model.layers[0]
    attn = layer.self_attn
    cfg = lm.cfg
    B, L = batch["input_ids"].shape
    x_BLD = torch.randn(B, L, cfg.hidden_size)
    tables = rope_tables(batch["position_ids"], cfg.head_dim, cfg.rope_theta)
    full = ref_rope_cos_sin(batch["position_ids"], cfg.head_dim, cfg.rope_theta, torch.float32)
    q_BLHK = torch.randn(B, L, attn.H, attn.K).to(AC)
    k_BLGK = torch.randn(B, L, attn.G, attn.K).to(AC)
    vblock = model.vision_model.trunk.blocks[0]
    vd = model.config.vision_config.hidden_size
    x_vit = torch.randn(n_img, (64 // 8) ** 2, vd)
    cu, ms = batch["cu_seqlens"], batch["max_seqlen"]
    ln = layer.input_layernorm

    def llm_norm_ref(x):  # fp32 out, cast by each of q/k/v_proj
        y = ref_rmsnorm_forward(ln, x)
        return [y.to(AC) for _ in range(3)]

    def llm_norm_new(x):
        y = ln(x)
        return [y, y, y]

    vn = vblock.norm_2

    def vit_norm_ref(x):
        y = ref_rmsnorm_forward(vn, x)
        return [y.to(AC) for _ in range(2)]

    def vit_norm_new(x):
        y = vn(x)
        return [y, y]

    def qk_ref(q, k):
        q = ref_apply_rope(ref_rmsnorm_forward(attn.q_norm, q).transpose(1, 2), *full)
        k = ref_apply_rope(ref_rmsnorm_forward(attn.k_norm, k).transpose(1, 2), *full)
        return [q.to(AC), k.to(AC)]  # attention's autocast cast

    def qk_new(q, k):
        return [norm_rope(q, attn.q_norm.weight, attn.q_norm.eps, *tables, AC).transpose(1, 2),
                norm_rope(k, attn.k_norm.weight, attn.k_norm.eps, *tables, AC).transpose(1, 2)]

    lparams = list(layer.parameters())
    vparams = list(vblock.parameters())

    def layer_ref(x):
        return layer(x, full, cu, ms)[0]

    def layer_new(x):
        return layer(x, tables, cu, ms)[0]

    pairs = {
        "LLM RMSNorm [4,512,256] -> 3 Linears": (fwd_bwd(llm_norm_ref, [x_BLD], [ln.weight]),
                                                 fwd_bwd(llm_norm_new, [x_BLD], [ln.weight])),
        f"ViT RMSNorm [{n_img},64,128] -> 2 Linears": (fwd_bwd(vit_norm_ref, [x_vit], [vn.weight]),
                                                      fwd_bwd(vit_norm_new, [x_vit], [vn.weight])),
        "q/k RMSNorm + RoPE (one layer)": (fwd_bwd(qk_ref, [q_BLHK, k_BLGK], [attn.q_norm.weight, attn.k_norm.weight]),
                                           fwd_bwd(qk_new, [q_BLHK, k_BLGK], [attn.q_norm.weight, attn.k_norm.weight])),
        "decoder layer (packed rows)": (in_ref(fwd_bwd(layer_ref, [x_BLD], lparams)),
                                        fwd_bwd(layer_new, [x_BLD], lparams)),
        f"ViT block [{n_img},64,128]": (in_ref(fwd_bwd(vblock, [x_vit], vparams)), fwd_bwd(vblock, [x_vit], vparams)),
    }
    return pairs, (layer_new, [x_BLD], lparams), (vblock, [x_vit], vparams)


def compile_rows(layer_case, vit_case, model: SailVL, batch: dict, repeat: int) -> list[list]:
    """torch.compile (inductor) of one decoder layer / one ViT block, then of every layer and block of the model
    (dynamic shapes: image counts and sample boundaries change from step to step): compile seconds (the first
    fwd+bwd or step, wall) and steady-state ms against eager."""
    import torch._dynamo

    rows = []
    for name, (call, inputs, params) in (("decoder layer", layer_case), ("ViT block", vit_case)):
        torch._dynamo.reset()
        compiled = torch.compile(call, dynamic=False)
        eager, comp = fwd_bwd(call, inputs, params), fwd_bwd(compiled, inputs, params)
        t0 = time.perf_counter()
        comp()
        t_compile = time.perf_counter() - t0
        t = compare_cpu({"eager": eager, "compiled": comp}, warmup=2, repeat=repeat)
        rows.append([name + " (static shapes)", f"{t_compile:.0f} s", t["eager"], t["compiled"],
                     t["eager"] / t["compiled"]])
    torch._dynamo.reset()
    compiled_model = copy.deepcopy(model)
    for m in [*compiled_model.vision_model.trunk.blocks, *compiled_model.language_model.model.layers]:
        m.compile(dynamic=True)
    eager, comp = step_fn(copy.deepcopy(model), batch), step_fn(compiled_model, batch)
    t0 = time.perf_counter()
    comp()
    t_compile = time.perf_counter() - t0
    t = compare_cpu({"eager": eager, "compiled": comp}, warmup=2, repeat=max(5, repeat // 4))
    rows.append(["whole step, every layer and block compiled (dynamic)", f"{t_compile:.0f} s", t["eager"],
                 t["compiled"], t["eager"] / t["compiled"]])
    return rows


def adamw_rows(model: SailVL, repeat: int) -> list[list]:
    """What-if, not applied (sailvl/train/optim.py): AdamW as the trainer builds it on CPU (fused=None: the
    per-parameter loop) against fused=True (one kernel per parameter)."""
    opts = {}
    for fused in (None, True):
        m = copy.deepcopy(model)
        for p in m.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        opts[fused] = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=fused).step
    t = compare_cpu({"loop": opts[None], "fused": opts[True]}, warmup=2, repeat=repeat)
    n = sum(p.numel() for p in model.parameters())
    return [[f"AdamW step, {n / 1e6:.1f}M parameters", t["loop"], t["fused"], t["loop"] / t["fused"]]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of a decoder layer / ViT block")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    repeat = 7 if args.quick else 21
    batch = make_batch()
    n_img = batch["pixel_values"].shape[0]
    model = build_model()
    pairs, layer_case, vit_case = component_fns(model, batch, n_img)
    rows = []
    for name, (ref, new) in pairs.items():
        t = compare_cpu({"ref": ref, "new": new}, warmup=3, repeat=repeat * 3)
        rows.append([name, t["ref"], t["new"], t["ref"] / t["new"]])
    ref_model, new_model = model, copy.deepcopy(model)
    t = compare_cpu({"ref": in_ref(step_fn(ref_model, batch)), "new": step_fn(new_model, batch)}, warmup=3,
                    repeat=repeat)
    rows.append([f"whole step (fwd+bwd+AdamW, {n_img} images)", t["ref"], t["new"], t["ref"] / t["new"]])
    print_table("tiny recipe CPU training step, fwd+bwd, median thread-CPU ms", ["component", "reference ms",
                "sailvl ms", "speed-up"], rows)
    print_table("what-if, not applied: AdamW on CPU, median thread-CPU ms", ["step", "fused=None (trainer) ms",
                "fused=True ms", "speed-up"], adamw_rows(model, repeat))
    if args.compile:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp()  # cold compiles, as a fresh training run sees
        print_table("torch.compile (inductor, CPU) vs eager sailvl, fwd+bwd, median thread-CPU ms",
                    ["what", "compile (first call, wall)", "eager ms", "compiled ms", "speed-up"],
                    compile_rows(layer_case, vit_case, model, batch, repeat * 2))


if __name__ == "__main__":
    main()
