"""Sparse MoE block: ours vs transformers' Qwen3MoeSparseMoeBlock (its default experts implementation, as a
from_pretrained user gets it), same weights, same process. Forward (inference) and forward+backward.

Run: .venv/bin/python benchmarks/bench_moe.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import compare, print_table  # noqa: E402
from sailvl.config import LLMConfig  # noqa: E402
from sailvl.model.moe import SparseMoeBlock  # noqa: E402

SHAPES = {  # (hidden, experts, top-k, expert FFN)
    "A3B-like/8": (256, 128, 8, 96),
    "small": (512, 32, 4, 256),
}


def build(hidden, experts, k, inter):
    torch.manual_seed(0)
    hf_cfg = Qwen3MoeConfig(vocab_size=32, hidden_size=hidden, intermediate_size=hidden, moe_intermediate_size=inter,
                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                            num_experts=experts, num_experts_per_tok=k, norm_topk_prob=True)
    hf_model = Qwen3MoeForCausalLM(hf_cfg)
    hf = hf_model.model.layers[0].mlp
    impl = hf_model.config._experts_implementation
    ours = SparseMoeBlock(LLMConfig(hidden_size=hidden, num_attention_heads=4, num_key_value_heads=4,
                                    num_experts=experts, num_experts_per_tok=k, moe_intermediate_size=inter))
    with torch.no_grad():
        torch.nn.init.normal_(hf.gate.weight, std=0.02)
        ours.gate.weight.copy_(hf.gate.weight)
        for p in (hf.experts.gate_up_proj, hf.experts.down_proj):
            torch.nn.init.normal_(p, std=0.02)
        ours.experts.gate_up_proj.copy_(hf.experts.gate_up_proj.transpose(1, 2))
        ours.experts.down_proj.copy_(hf.experts.down_proj.transpose(1, 2))
    return hf, ours, impl


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rep = 3 if args.quick else 9
    rows = []
    tokens = 2048
    for name, shape in SHAPES.items():
        hf, ours, impl = build(*shape)
        x = torch.randn(4, tokens // 4, shape[0])
        with torch.no_grad():
            diff = (hf(x) - ours(x)[0]).abs().max().item()
        assert diff < 1e-4, f"outputs differ by {diff}"
        xg = x.clone().requires_grad_()

        def fwd_bwd(m, pick):
            def run():
                m.zero_grad(set_to_none=True)
                pick(m(xg)).square().mean().backward()
            return run

        def set_impl(value):  # transformers reads the experts implementation from the config at call time
            hf.experts.config._experts_implementation = value

        for impl_name in (impl, "eager"):
            set_impl(impl_name)
            with torch.no_grad():
                t = compare({"hf": lambda: hf(x), "ours": lambda: ours(x)}, repeat=rep)
            rows.append([name, "forward", impl_name, tokens / t["hf"], tokens / t["ours"], t["hf"] / t["ours"]])
            t = compare({"hf": fwd_bwd(hf, lambda y: y), "ours": fwd_bwd(ours, lambda y: y[0])}, repeat=rep)
            rows.append([name, "fwd+bwd", impl_name, tokens / t["hf"], tokens / t["ours"], t["hf"] / t["ours"]])
        set_impl(impl)
    print_table(f"MoE block, {tokens} tokens, fp32, tokens/s (higher is better)",
                ["shape", "pass", "transformers experts impl", "transformers", "sailvl",
                 "ratio sailvl/transformers"], rows)
    print("\nshapes (hidden, experts, top-k, expert ffn): " + ", ".join(f"{k}={v}" for k, v in SHAPES.items()))


if __name__ == "__main__":
    main()
