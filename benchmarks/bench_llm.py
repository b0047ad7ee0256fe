"""Forward+backward tokens/s: our Qwen3 decoder vs transformers' Qwen3ForCausalLM, same weights, same process.

Run: .venv/bin/python benchmarks/bench_llm.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Qwen3Config, Qwen3ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import QWEN3_CONFIGS as CONFIGS, compare, print_table  # noqa: E402
from sailvl.checkpoint.imports import import_qwen3  # noqa: E402
from sailvl.model.llm import Qwen3ForCausalLM as Ours  # noqa: E402

def build(name: str):
    torch.manual_seed(0)
    hf = Qwen3ForCausalLM(Qwen3Config(**CONFIGS[name], tie_word_embeddings=True)).train()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        cfg, state = import_qwen3(d)
    ours = Ours(cfg).train()
    ours.load_state_dict({k.removeprefix("language_model."): v for k, v in state.items()})
    return hf, ours


def step_fn(model, ids, bf16: bool):
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()

    def step():
        model.zero_grad(set_to_none=True)
        with ctx:
            logits = model(ids).logits
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny config only, fewer repeats")
    args = ap.parse_args()
    rows = []
    for name in ["tiny"] if args.quick else ["tiny", "small"]:
        hf, ours = build(name)
        B, L = (4, 256)
        ids = torch.randint(0, CONFIGS[name]["vocab_size"], (B, L))
        for bf16 in (False, True):
            t = compare({"hf": step_fn(hf, ids, bf16), "ours": step_fn(ours, ids, bf16)}, warmup=1,
                        repeat=3 if args.quick else 5)
            tok = B * L
            rows.append([name, "bf16 autocast" if bf16 else "fp32", f"{B}x{L}", tok / t["hf"], tok / t["ours"],
                         t["hf"] / t["ours"]])
    print_table("LLM forward+backward, tokens/s (higher is better)",
                ["config", "dtype", "batch", "transformers", "sailvl", "ratio sailvl/transformers"], rows)


if __name__ == "__main__":
    main()
