"""How many distinct text instructions a from-scratch tiny LLM needs to learn to copy from its prompt.

text_instruct asks for the first / last word of a list, the list repeated or reversed, numbers sorted, ... (the
synthetic world's language-only task). The tiny recipe's train split holds ~2,500 of them; the demo's LLM answered
"Repeat these words: moon, book, cat." with "cup, sun, sun" (held-out text_instruct 0.18). Here the LLM alone
(random init, std 0.06, the tiny model) trains the same steps on a pool of N distinct records, for each N, and is
scored on held-out records whose questions are in no pool. Ratios against the smallest pool.

Measured on the 2-core CPU (300 steps of 4 x 512 tokens, ~19 samples a row, ~50 s per row; 200 held out):
2,500 distinct 0.62 (first / last / repeat 1.00, reverse 0.68, sort 0.36), 24,000 distinct 0.60 (1.00 / 1.00 /
0.93, 1.00, 0.36), 0.97x. So the train split's 2,500 are enough: what the demo's LLM lacks is exposures (~23k
here against ~2k in the demo's old mixture), not distinct records.

Run: .venv/bin/python benchmarks/text_copy.py [--tokenizer runs/demo/01_vit_read/model] [--steps 300]
     [--pools 2500,24000]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import print_table, train_and_score  # noqa: E402


def records(n_test: int, pools: list[int], seed: int = 0) -> tuple[list[dict], list[list[dict]]]:
    """Held-out records, then one list of distinct training records per pool size (nested: each pool holds the
    smaller ones); no held-out question is in any pool."""
    from sailvl.data.synth import sample
    from sailvl.recipes.tiny import TINY_WORLD

    rng, seen = random.Random(seed), set()

    def distinct(n: int) -> list[dict]:
        out = []
        for _ in range(50 * n):
            rec, _ = sample("text_instruct", rng, world=TINY_WORLD)
            q = rec["conversations"][0]["value"]
            if q not in seen:
                seen.add(q)
                out.append(rec)
                if len(out) == n:
                    return out
        raise SystemExit(f"only {len(out)} more distinct text_instruct records found; lower --pools / --n-test")

    test = distinct(n_test)
    train = distinct(max(pools))
    return test, [train[:n] for n in pools]


def run_one(tokenizer: str, pool: list[dict], test: Path, steps: int, work: Path) -> tuple[float, dict, float]:
    from sailvl.recipes.tiny import tiny_model
    from sailvl.train.stages import DataSpec, RunConfig, Stage

    data = work / f"pool_{len(pool)}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pool))
    torch.manual_seed(0)
    stage = Stage("text", steps, [DataSpec(str(data), 1.0, "text")], lr={"llm": 1e-3}, trainable=["llm"],
                  max_len=512, rows_per_step=4, warmup_steps=10, schedule="constant", loss_weighting="sqrt")
    run = RunConfig(name=f"pool_{len(pool)}", stages=[stage], out_dir=str(work), model=tiny_model(),
                    tokenizer=tokenizer, precision="bf16", checkpoint_every=10**9, log_every=10**9)
    return train_and_score(run, test, work / f"eval_{len(pool)}.jsonl", lambda r: r["meta"]["kind"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", default="runs/demo/01_vit_read/model",
                    help="a directory with the tiny world's tokenizer.json (the demo's model or data/tokenizer)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--pools", default="2500,24000")
    ap.add_argument("--n-test", type=int, default=200)
    args = ap.parse_args()
    if not (Path(args.tokenizer) / "tokenizer.json").exists():
        raise SystemExit(f"no tokenizer.json in {args.tokenizer}: run `make demo` first or pass --tokenizer")
    from sailvl.cli import _tune_malloc

    _tune_malloc()
    pools = [int(p) for p in args.pools.split(",")]
    test_records, pool_records = records(args.n_test, pools)
    shown = ("first", "last", "repeat", "reverse", "sort")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        test = work / "test.jsonl"
        test.write_text("".join(json.dumps(r) + "\n" for r in test_records))
        rows, ref = [], None
        for n, pool in zip(pools, pool_records):
            acc, by_kind, seconds = run_one(args.tokenizer, pool, test, args.steps, work)
            ref = acc if ref is None else ref
            rows.append([f"{n:,}", f"{acc:.3f}", *(f"{by_kind.get(k, float('nan')):.2f}" for k in shown),
                         f"{seconds:.0f}", f"{acc / max(ref, 1e-9):.2f}x"])
            print(rows[-1], flush=True)
    print_table(f"text_instruct held out ({args.n_test}) after {args.steps} steps of 4 x 512 tokens, LLM only",
                ["distinct records", "held-out", *shown, "train s", f"vs {pools[0]:,}"], rows)


if __name__ == "__main__":
    main()
