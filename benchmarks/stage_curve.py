"""Per-task held-out accuracy after each stage of a tiny-recipe run: which tasks are still rising (more steps
would help) and which are stuck (they need something else).

Every stage of a run exports a SAIL-VL2-layout model (RUN_DIR/NN_<stage>/model); this scores each of them on
the run's test split with the demo's scorers and prints one table, a column per stage. A diagnostic rather than
a benchmark: nothing is compared against a reference.

Measured on the demo (seed 0, session 9): colour, count, scene_qa and math_direct keep rising through SFT
(math_direct 0.16 -> 0.44 -> 0.88 over pretrain_basic, multi-task pretraining and SFT), while table, chart,
text_instruct, spatial, motion, multi_change and grounding move by at most 0.12 from multi-task pretraining to
the end (~1,400 steps) and end within ~0.15 of chance (seed 1 alike).

Run: .venv/bin/python benchmarks/stage_curve.py [runs/demo] [--first vit_finegrained] [--limit 50]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import print_table  # noqa: E402


def stage_models(run_dir: Path, first: str | None) -> list[tuple[str, Path]]:
    """(stage name, model dir) of the run's finished VLM stages, in order, from `first` on."""
    out = []
    for d in sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name[:2].isdigit()):
        name = d.name.split("_", 1)[1]
        if first is not None and not out and name != first:
            continue
        if (d / "model" / "config.json").exists():
            out.append((name, d / "model"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", nargs="?", default="runs/demo", help="a run directory (default: the demo's)")
    ap.add_argument("--data", help="test JSONL (default: RUN_DIR/data/test.jsonl)")
    ap.add_argument("--first", default="vit_finegrained",
                    help="first stage to score (the SAIL-ViT pretraining stages before it cannot answer)")
    ap.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    args = ap.parse_args()
    run_dir = Path(args.run_dir)
    data = Path(args.data) if args.data else run_dir / "data" / "test.jsonl"
    if not data.exists():
        raise SystemExit(f"no test split at {data}: pass --data or run `make demo` first")
    models = stage_models(run_dir, args.first) if run_dir.is_dir() else []
    if not models:
        raise SystemExit(f"no exported stage models in {run_dir} (from stage {args.first!r} on)")

    from sailvl import load
    from sailvl.cli import _tune_malloc
    from sailvl.eval.synth import evaluate

    _tune_malloc()
    reports = []
    for name, model_dir in models:
        pipe = load(model_dir)
        reports.append(evaluate(pipe.model, pipe.processor, data, limit_per_task=args.limit))
        print(f"{name}: {reports[-1]['accuracy']:.3f}", flush=True)
    tasks = sorted(reports[0]["tasks"])
    rows = [[t, *(f"{r['tasks'][t]['score']:.2f}" for r in reports), f"{reports[-1]['tasks'][t]['chance']:.2f}"]
            for t in tasks]
    rows.append(["**overall**", *(f"{r['accuracy']:.2f}" for r in reports), ""])
    print_table(f"held-out score after each stage of {run_dir} ({data})",
                ["task", *(name for name, _ in models), "chance"], rows)


if __name__ == "__main__":
    main()
