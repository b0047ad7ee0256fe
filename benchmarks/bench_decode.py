"""Single-stream decode tokens/s with a KV cache: sailvl `generate` vs transformers `generate`, same Qwen3
weights (imported into a SailVL with a tiny ViT), greedy, same process. Also checks both produce the
same tokens.

Run: .venv/bin/python benchmarks/bench_decode.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import QWEN3_CONFIGS as CONFIGS, compare, print_table  # noqa: E402
from sailvl.checkpoint.hf import load_state_strict  # noqa: E402
from sailvl.checkpoint.imports import import_qwen3  # noqa: E402
from sailvl.config import tiny_config  # noqa: E402
from sailvl.model.generate import GenerationConfig, generate  # noqa: E402
from sailvl.model.vlm import SailVL  # noqa: E402

def build(name):
    torch.manual_seed(0)
    hf = Qwen3ForCausalLM(Qwen3Config(**CONFIGS[name], tie_word_embeddings=True)).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        lcfg, lstate = import_qwen3(d)
    cfg = tiny_config()
    cfg.llm_config = lcfg
    model = SailVL(cfg)
    vis = {k: v for k, v in model.state_dict().items() if not k.startswith("language_model.")}
    load_state_strict(model, {**vis, **lstate})
    return hf, model.eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    prompt_len, new = 64, 128
    rows = []
    for name in ["tiny"] if args.quick else ["tiny", "small"]:
        hf, ours = build(name)
        prompt = torch.randint(0, CONFIGS[name]["vocab_size"], (1, prompt_len))
        gen = GenerationConfig(max_new_tokens=new)

        def run_hf():
            return hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, prompt_len:].tolist()

        def run_ours():
            return generate(ours, [prompt[0].tolist()], gen).tokens[0]

        with torch.no_grad():
            same = run_hf() == run_ours()
            t = compare({"hf": run_hf, "ours": run_ours}, warmup=1, repeat=3 if args.quick else 5)
        rows.append([name, f"{prompt_len}+{new}", new / t["hf"], new / t["ours"], t["hf"] / t["ours"], same])
    print_table("Decode, batch 1, greedy, fp32, tokens/s (incl. prefill; higher is better)",
                ["config", "prompt+new", "transformers generate", "sailvl generate", "ratio", "same tokens"], rows)


if __name__ == "__main__":
    main()
