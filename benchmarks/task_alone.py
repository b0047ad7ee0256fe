"""Which synthetic tasks are learnable in the demo's budget when they get the samples: each task trained alone.

For every task named, a fresh adapter + LLM (the tiny recipe's shapes, init std 0.06) on the ViT of a finished demo
run trains on that task's records only (the tiny world, `--n-train` records) for `--steps` steps of 2 x 512 tokens,
as the recipe's VLM stages do, and is scored on `--n-test` held-out records with the demo's scorer. The table puts
that next to the task's score in the demo run (`demo_report.json`), with the number of samples the task-alone run
trained on: a task the model learns alone but not in the demo is short of samples in the demo's mixture; one it
does not learn alone either needs something else.

Measured on the 2-core CPU (600 steps, the tower of the seed-0 demo, 3.5-4.5 min per task; 400 held out; the
demo's own VLM stages give each scene task ~440 single-question samples):
| task | alone | samples (alone) | in the demo |
|---|---|---|---|
| video_motion | 0.91 | 4,416 | 0.24 (~470 samples; with the recipe's motion group, ~1,600: 0.72) |
| multi_change | 0.79 | 8,400 | 0.24 (~440 samples) |
| vqa_spatial | 0.34 | 13,200 | 0.26 (the axis is learnt, the side never: "right" 0.00) |
| chart | 0.27 | 16,748 | 0.18 |
| vqa_compare | 0.89 | 15,211 | 0.42 (~440 samples, plus its questions in ~5,100 scene drills) |
| grounding | 0.35 | 7,200 | 0.28 |

Run (after `make demo`): .venv/bin/python benchmarks/task_alone.py [--run runs/demo] [--tasks video_motion,...]
     [--steps 600]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import fresh_on_tower, print_table, probe_run, train_and_score  # noqa: E402


def run_task(task: str, tower: str, steps: int, n_train: int, n_test: int, work: Path) -> tuple[float, float, int]:
    from sailvl.data.synth import generate_splits
    from sailvl.recipes.tiny import TINY_WORLD

    work = work / task
    generate_splits(work / "data", n_train, 0, n_test, seed=5, tasks=[task], world=TINY_WORLD)
    init = fresh_on_tower(tower, work / "init", std=0.06)
    run = probe_run("run", work / "data" / "train.jsonl", init, work, steps, optimizer="muon")
    acc, _, seconds = train_and_score(run, work / "data" / "test.jsonl", work / "eval.jsonl", lambda r: r["task"])
    samples = sum(json.loads(x)["samples"] for x in (work / "run" / "metrics.jsonl").read_text().splitlines())
    return acc, seconds, samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo", help="a finished demo run directory (its tower and report)")
    ap.add_argument("--tasks", default="video_motion,vqa_spatial")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--n-train", type=int, default=14000)
    ap.add_argument("--n-test", type=int, default=400)
    args = ap.parse_args()
    run_dir = Path(args.run)
    towers = sorted(run_dir.glob("01_*/model/config.json"))
    if not towers:
        raise SystemExit(f"no finished SAIL-ViT stage under {run_dir}: run `make demo` first or pass --run")
    tower = str(towers[0].parent)
    report = run_dir / "demo_report.json"
    demo = json.loads(report.read_text()).get("tasks", {}) if report.exists() else {}
    from sailvl.cli import _tune_malloc

    _tune_malloc()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks.split(","):
            acc, seconds, samples = run_task(task, tower, args.steps, args.n_train, args.n_test, Path(tmp))
            in_demo = demo.get(task, {}).get("score", float("nan"))
            rows.append([task, f"{acc:.2f}", f"{samples:,}", f"{in_demo:.2f}", f"{seconds:.0f}"])
            print(rows[-1], flush=True)
    print_table(f"each task alone: {args.steps} steps of 2 x 512 tokens from the demo's tower, {args.n_test} held out",
                ["task", "alone", "samples trained", "in the demo", "train s"], rows)


if __name__ == "__main__":
    main()
