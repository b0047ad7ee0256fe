"""Muon vs AdamW for the tiny recipe: the optimiser step's cost, and how fast each teaches the LLM a lookup.

1. Step time of the optimiser alone on the tiny recipe's trainable matrices in the LLM stages (adapter + LLM):
   torch's fused AdamW, torch.optim.Muon, and sailvl's MuonAdamW (shapes iterated as batches).
2. The lookup every scene question needs (benchmarks/llm_init.py's "Where is the <shape>?" about 1-3 objects, a
   trained tower frozen, adapter + LLM from random weights): held-out accuracy after the same steps with each
   optimiser, and AdamW with as many more steps as Muon's extra time buys.
3. (--dense) SAIL-ViT dense pretraining (the demo's vit_dense stage): per-patch character / shape accuracy of
   the training batches along the way, AdamW vs Muon.

Measured on the 2-core CPU (tower: the demo's vit_read model; single runs, noise about +-0.03):
  step: fused AdamW 1.4-2.1 ms, torch.optim.Muon 69-118 ms, MuonAdamW 59-90 ms (two runs; the bf16 Newton-Schulz products run
  at ~400 GFLOP/s: the iteration's flops, not overhead, set the cost; a VLM step of 2 x 512 tokens is ~150 ms)
  lookup, 400 steps: AdamW 0.60, Muon 0.77 (3 objects 0.33 -> 0.55); Muon 330 steps 0.70 vs AdamW 580 steps
  0.66 in the same ~90 s
  vit_dense: char accuracy after 600 / 1000 steps AdamW 0.70 / 0.78, Muon 0.80 / 0.88 (Muon at 600 steps
  matches AdamW at 1000)

Run: .venv/bin/python benchmarks/muon.py [--tower runs/demo/01_vit_read/model] [--steps 400] [--dense]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import compare, fresh_on_tower, print_table, probe_run, train_and_score  # noqa: E402
from benchmarks.llm_init import where_records  # noqa: E402


def step_times() -> None:
    from sailvl.recipes.tiny import tiny_model
    from sailvl.model.vlm import SailVL
    from sailvl.train.muon import MuonAdamW, use_muon

    model = SailVL(tiny_model())
    mats = [p for n, p in model.named_parameters() if not n.startswith("vision_model.") and use_muon(n, p)]
    for p in mats:
        p.grad = torch.randn_like(p) * 1e-3
    opts = {"AdamW (torch, fused)": torch.optim.AdamW(mats, lr=1e-3, fused=True),
            "Muon (torch.optim.Muon)": torch.optim.Muon(mats, lr=1e-3, adjust_lr_fn="match_rms_adamw"),
            "Muon (sailvl MuonAdamW)": MuonAdamW([{"params": mats, "muon": True}], lr=1e-3)}
    best = compare({k: o.step for k, o in opts.items()}, warmup=2, repeat=10)
    ref = best["AdamW (torch, fused)"]
    print_table(f"optimiser step on the LLM stages' {len(mats)} matrices ({sum(p.numel() for p in mats) / 1e6:.2f}M)",
                ["optimiser", "ms", "vs AdamW"], [[k, f"{v * 1e3:.1f}", f"{v / ref:.0f}x"] for k, v in best.items()])


def lookup(tower: str, steps: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        where_records(12000, 1, work / "data", "train")
        where_records(600, 2, work / "data", "test")
        init = fresh_on_tower(tower, work / "init")  # adapter and LLM from random weights, the tower copied

        def run(optimizer: str, n: int) -> tuple[float, dict, float]:
            cfg = probe_run(f"{optimizer}_{n}", work / "data" / "train.jsonl", init, work, n, optimizer=optimizer)
            return train_and_score(cfg, work / "data" / "test.jsonl", work / f"eval_{optimizer}_{n}.jsonl",
                                   lambda r: r["objects"])

        rows = []
        results = {}
        for optimizer in ("adamw", "muon"):
            results[optimizer] = run(optimizer, steps)
        matched = int(round(steps * results["muon"][2] / results["adamw"][2]))  # AdamW steps in Muon's time
        results["adamw, same time"] = run("adamw", matched)
        ref = results["adamw"][0]
        for name, (acc, by_n, seconds) in results.items():
            n = matched if name == "adamw, same time" else steps
            rows.append([name, str(n), f"{acc:.3f}", *(f"{by_n.get(k, float('nan')):.2f}" for k in (1, 2, 3)),
                         f"{seconds:.0f}", f"{acc / max(ref, 1e-9):.2f}x"])
            print(rows[-1], flush=True)
    print_table("'Where is the <shape>?' (600 held out), adapter + LLM on a frozen tower, 2 x 512 tokens a step",
                ["optimiser", "steps", "held-out", "1 object", "2 objects", "3 objects", "train s", "vs AdamW"], rows)


def dense(tower: str, steps: int) -> None:
    from sailvl.recipes.tiny import tiny
    from sailvl.train.trainer import Trainer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for optimizer in ("adamw", "muon"):
            run = tiny(data_dir=f"{tmp}/data", out_dir=tmp, name=optimizer)  # vit_dense needs no data files
            run.stages = [dataclasses.replace(run.stages[0], steps=steps, optimizer=optimizer)]
            run.tokenizer, run.log_every = tower, 1  # any tokenizer: a vision stage reads no text
            t0 = time.perf_counter()
            Trainer(run, quiet=True).fit()
            seconds = time.perf_counter() - t0
            recs = [json.loads(x) for x in (Path(tmp) / optimizer / "metrics.jsonl").read_text().splitlines()]
            marks = [steps * k // 5 for k in range(1, 6)]
            accs = []
            for end in marks:  # mean over the 50 steps up to each mark (one batch is noisy)
                w = [r for r in recs if end - 50 < r["step"] <= end]
                accs.append(f"{sum(r['acc_char'] for r in w) / len(w):.3f}")
            rows.append([optimizer, *accs, f"{seconds:.0f}"])
            print(rows[-1], flush=True)
    print_table("vit_dense: per-patch character accuracy of the training batches (64 images a step)",
                ["optimiser", *(f"step {steps * k // 5}" for k in range(1, 6)), "train s"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tower", default="runs/demo/01_vit_read/model", help="a model directory whose ViT is used")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--dense", action="store_true", help="also compare on the vit_dense stage (~6 minutes)")
    ap.add_argument("--dense-steps", type=int, default=1000)
    args = ap.parse_args()
    from sailvl.cli import _tune_malloc

    _tune_malloc()
    step_times()
    if not (Path(args.tower) / "config.json").exists():
        raise SystemExit(f"no model directory at {args.tower}: run `make demo` first or pass --tower")
    lookup(args.tower, args.steps)
    if args.dense:
        dense(args.tower, args.dense_steps)


if __name__ == "__main__":
    main()
