"""Training the tiny recipe on a 2-core CPU: one process with 2 threads (the reference: what `sailvl demo` did
before) against 2 processes of 1 thread each under torchrun, with the whole model on each rank and one gradient
all-reduce per step (`parallel="ddp"`) or FSDP2 (`parallel="fsdp"`, per-block collectives), on the same global
batches (rows per rank = rows / processes).

Each contender is a real `sailvl train` run of two stages of the tiny recipe: `vit_dense` (the ViT alone on dense
labels, 64 images per step) and `pretrain_multitask` (the VLM on the multi-task mixture, 4 rows x 512 tokens per
step), everything else skipped. Throughput = the stage's work (images / tokens) over the summed per-step wall times
in metrics.jsonl after the first `--skip` steps (warm-up). The contenders run one after another on an otherwise
idle machine, so the table is only meaningful there.

Run: .venv/bin/python benchmarks/bench_parallel.py [--steps 60] [--skip 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import print_table  # noqa: E402

TIMED = {"vit_dense": "images", "pretrain_multitask": "tokens"}


def contender(name: str, procs: int, parallel: str, data: Path, out: Path, steps: int) -> list[str]:
    over = [f"data_dir={data}", f"out_dir={out}", f"name={name}", f"parallel={parallel}", "log_every=1000",
            "checkpoint_every=100000"]
    from sailvl.recipes.tiny import tiny

    for st in (s.name for s in tiny().stages):  # every other stage runs 0 steps
        over.append(f"stages.{st}.steps={steps if st in TIMED else 0}")
    rows = {"vit_dense": 64, "pretrain_multitask": 4}
    over += [f"stages.{st}.rows_per_step={r // procs}" for st, r in rows.items()]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)] if procs > 1 else []
    return [sys.executable, *launcher, "-m", "sailvl", "train", "tiny", *over]


def throughput(run_dir: Path, skip: int) -> dict[str, float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    out = {}
    for stage, unit in TIMED.items():
        mine = [r for r in recs if r["stage"] == stage][skip:]
        rate = f"{unit}_per_s"
        out[stage] = sum(r[unit] for r in mine) / sum(r[unit] / r[rate] for r in mine)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--skip", type=int, default=10)
    args = ap.parse_args()
    from sailvl.recipes.tiny import prepare_tiny, tiny

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepare_tiny(tiny(data_dir=str(tmp / "data")), n_train=6000, n_eval=50)
        contenders = {"1 process x 2 threads (reference)": (1, "fsdp", "2"),
                      "2 processes x 1 thread, ddp": (2, "ddp", "1"),
                      "2 processes x 1 thread, fsdp": (2, "fsdp", "1")}
        results = {}
        for i, (label, (procs, parallel, threads)) in enumerate(contenders.items()):
            env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONPATH": str(ROOT)}
            cmd = contender(f"c{i}", procs, parallel, tmp / "data", tmp / "runs", args.steps)
            subprocess.run(cmd, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            results[label] = throughput(tmp / "runs" / f"c{i}", args.skip)
    ref = results[next(iter(contenders))]
    rows = [[label, r["vit_dense"], r["vit_dense"] / ref["vit_dense"], r["pretrain_multitask"],
             r["pretrain_multitask"] / ref["pretrain_multitask"]] for label, r in results.items()]
    print_table(f"tiny recipe training, same global batches ({args.steps} steps per stage, first {args.skip} "
                f"not timed)", ["contender", "vit_dense images/s", "x", "pretrain_multitask tokens/s", "x"], rows)


if __name__ == "__main__":
    main()
