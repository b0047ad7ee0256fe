"""What more steps buy, by stage group: the tiny recipe with its SAIL-ViT stages (vit_dense, vit_read, vit_warmup)
and its VLM stages (the rest) scaled apart, each run scored per task on the held-out test split.

Every pair `VIT,VLM` in --pairs is one whole run from the same data and seed (fixed step counts, no time budget).
A diagnostic rather than a benchmark: the numbers are accuracies, not speeds. Runs go one after another, or
`--jobs N` at a time (on a machine with the cores or a GPU for it: each run picks CUDA when there is one).

Measured (session 17, a lent H200, five runs side by side; seed 0): 1,1 -> 0.54; 1,2 -> 0.65; 2,1 -> 0.55 (2,2 and
1,3 did not finish inside the lease). On this 2-core CPU (a session script that
trains only the VLM stages from one tower): x1 0.533, x1.5 0.621.
That is why the demo's time budget hands spare time to the VLM stages only (`Reference.grow` in recipes/tiny.py).
A 1,1 run takes ~10-20 min on the 2-core CPU (by the hour), ~5 min on the H200.

Run: .venv/bin/python benchmarks/stage_scaling.py [--pairs 1,1 1,2 2,1] [--out runs/scaling] [--jobs 1] [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import print_table  # noqa: E402

VIT_STAGES = ("vit_dense", "vit_read", "vit_warmup")


def one_run(vit: float, vlm: float, out: Path, data: Path, seed: int, quick: bool) -> dict:
    """Train the tiny recipe with the two stage groups scaled, evaluate, write and return the summary."""
    import torch

    from sailvl import load
    from sailvl.eval.synth import evaluate
    from sailvl.recipes.tiny import prepare_tiny, tiny
    from sailvl.train.trainer import Trainer

    name = f"vit{vit:g}_vlm{vlm:g}"
    run = tiny(data_dir=str(data), out_dir=str(out), name=name, scale=0.01 if quick else 1.0)
    run.seed = seed
    for s in run.stages:
        s.steps = max(1, round(s.steps * (vit if s.name in VIT_STAGES else vlm)))
    prepare_tiny(run, **(dict(n_train=600, n_eval=76) if quick else {}), seed=seed)
    t0 = time.perf_counter()
    final = Trainer(run, resume=(Path(run.run_dir) / "run.json").exists()).fit()
    train_s = time.perf_counter() - t0
    pipe = load(final, device="cuda" if torch.cuda.is_available() else "cpu")
    report = evaluate(pipe.model, pipe.processor, data / "test.jsonl")
    summary = {"vit": vit, "vlm": vlm, "train_s": train_s, "accuracy": report["accuracy"],
               "tasks": {k: v["score"] for k, v in report["tasks"].items()},
               "steps": {s.name: s.steps for s in run.stages}}
    (out / f"{name}.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", nargs="+", default=["1,1", "1,2", "2,1"], help="VIT,VLM step factors, one run each")
    ap.add_argument("--out", default="runs/scaling")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (subprocesses)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny data, 1%% of the steps")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run this pair in this process
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    pairs = [tuple(float(x) for x in p.split(",")) for p in args.pairs]
    if args.one:
        vit, vlm = (float(x) for x in args.one.split(","))
        one_run(vit, vlm, out, data, args.seed, args.quick)
        return
    # the data once, before any run starts (runs side by side must not write it at the same time)
    from sailvl.recipes.tiny import prepare_tiny, tiny
    prepare_tiny(tiny(data_dir=str(data)), **(dict(n_train=600, n_eval=76) if args.quick else {}), seed=args.seed)
    base = [sys.executable, __file__, "--out", str(out), "--seed", str(args.seed), *(["--quick"] if args.quick else [])]
    pending, running = list(pairs), []
    while pending or running:
        while pending and len(running) < args.jobs:
            vit, vlm = pending.pop(0)
            log = open(out / f"vit{vit:g}_vlm{vlm:g}.log", "w")
            running.append((subprocess.Popen([*base, "--one", f"{vit:g},{vlm:g}"], stdout=log, stderr=log), log))
        for p, log in list(running):
            if p.poll() is not None:
                log.close()
                running.remove((p, log))
                if p.returncode:
                    print(f"run failed (exit {p.returncode}); see {log.name}")
        time.sleep(1)
    files = [out / f"vit{vit:g}_vlm{vlm:g}.json" for vit, vlm in pairs]
    results = [json.loads(f.read_text()) for f in files if f.exists()]
    tasks = sorted({t for r in results for t in r["tasks"]})
    rows = [[f"{r['vit']:g}", f"{r['vlm']:g}", f"{r['train_s']:.0f}", f"{r['accuracy']:.3f}",
             *(f"{r['tasks'].get(t, float('nan')):.2f}" for t in tasks)] for r in results]
    print_table("held-out accuracy by stage-group step factors (same data and seed)",
                ["ViT x", "VLM x", "train s", "overall", *tasks], rows)


if __name__ == "__main__":
    main()
