"""`sailvl demo`: the whole system end to end on a CPU, from nothing.

1. generate the built-in synthetic world (train / val / test) and train a byte-level BPE on it;
2. run the `tiny` recipe through all its stages (SAIL-ViT warm-up -> fine-grained -> world knowledge ->
   basic pretraining with AdaLRS -> multi-task pretraining -> SFT -> LongCoT SFT -> Think-Fusion SFT);
3. evaluate the final model on the held-out test split, per task, against each task's chance level;
4. answer two questions about a freshly generated image through `sailvl.load(dir).chat(...)`, one of
   them in thinking mode.
The result is an ordinary SAIL-VL2-layout model directory. `--quick` shrinks everything to a smoke run.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from .recipes.tiny import TINY_WORLD, prepare_tiny, tiny


def run(out_dir: str | Path = "runs", scale: float = 1.0, quick: bool = False, seed: int = 0,
        resume: bool = False, procs: int = 1, minutes: float | None = 15.0) -> dict:
    """`minutes` (not with `quick`): a wall-clock budget for the whole demo, data generation included. A ~4 s
    speed probe and then the seconds each finished stage really took set every stage's steps as it starts
    (`sailvl.train.budget`: cut from the recipe at `scale` when short of time; with time to spare the VLM stages
    run up to twice their steps); None or 0 runs the recipe as is.
    `procs` > 1: train under torchrun with that many processes (gloo, one thread each, the whole model on
    each: parallel="ddp") on the same global batches. Default 1 (in this process): measured on this 2-core CPU
    (benchmarks/bench_parallel.py), 2 processes are 1.23x faster on the ViT stage but no faster on the VLM stages
    (1.01x: the step's gradient all-reduce and the ranks waiting for each other eat the gain)."""
    from . import load
    from .data.synth import sample as synth_sample
    from .data.template import THINK_SUFFIX
    from .eval.synth import evaluate, table
    from .train.trainer import Trainer

    if procs < 1:
        raise ValueError(f"procs must be >= 1, got {procs}")
    out_dir = Path(out_dir)
    name = "demo-quick" if quick else "demo"
    data_dir = out_dir / name / "data"
    run_cfg = tiny(data_dir=str(data_dir), out_dir=str(out_dir), name=name, scale=0.01 if quick else scale)
    run_cfg.seed = seed
    timings = {}
    t0 = start = time.perf_counter()
    if quick:
        prepare_tiny(run_cfg, n_train=600, n_eval=76, seed=seed)
    else:  # the defaults, as `sailvl train tiny` prepares it: either command reuses what the other made
        prepare_tiny(run_cfg, seed=seed)
    timings["data + tokenizer"] = time.perf_counter() - t0
    print(f"[demo] synthetic world and tokenizer ready in {timings['data + tokenizer']:.1f}s ({data_dir})")

    budget = _budget(run_cfg, minutes, start, procs) if minutes and not quick else None
    t0 = time.perf_counter()
    final = _train(run_cfg, resume, procs) if procs > 1 else Trainer(run_cfg, resume=resume, budget=budget).fit()
    timings["training"] = time.perf_counter() - t0
    stage_times = _stage_times(Path(run_cfg.run_dir))

    t0 = time.perf_counter()
    pipe = load(final)
    report = evaluate(pipe.model, pipe.processor, data_dir / "test.jsonl",
                      out_jsonl=Path(run_cfg.run_dir) / "eval_test.jsonl")
    timings["evaluation"] = time.perf_counter() - t0
    print("\n[demo] held-out test split (score: exact match; grounding IoU >= 0.5; captions word F1)\n")
    print(table(report))

    rng = random.Random(seed + 12345)
    record, images = synth_sample("vqa_color", rng, world=TINY_WORLD)  # the world (and phrasing) it was trained on
    def bare(text: str) -> str:  # the question as printed, without its image placeholder
        return text.replace("<image>\n", "").replace("\n<image>", "")

    placed = record["conversations"][0]["value"]  # the image where the world puts it (before / after the question)
    question = bare(placed)
    answer = pipe.chat(images[0], placed, max_new_tokens=16)
    record_m, images_m = synth_sample("math_cot", rng, world=TINY_WORLD)
    placed_m = record_m["conversations"][0]["value"].removesuffix(THINK_SUFFIX)  # chat(thinking=True) adds it
    question_m = bare(placed_m)
    thought, boxed = pipe.chat(images_m[0], placed_m, thinking=True, return_thinking=True, max_new_tokens=160)
    print(f"\n[demo] chat, image 1: {question!r}\n       -> {answer!r} (truth: {record['answer']!r})")
    print(f"[demo] chat, image 2 (thinking): {question_m!r}\n       thinking: {thought!r}\n"
          f"       -> {boxed!r} (truth: {record_m['answer']!r})")
    print("\n[demo] time per part: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    print("[demo] time per stage: " + ", ".join(f"{k} {v:.0f}s" for k, v in stage_times.items()))
    if budget is not None:
        print(f"[demo] total {time.perf_counter() - start:.0f}s of a {minutes:g}-minute budget; steps run per stage: "
              + ", ".join(f"{k} {v['steps']}/{v['of']}" for k, v in budget.state["stages"].items()))
    print(f"[demo] model directory: {final}\n       chat with it:  sailvl.load('{final}').chat('image.png', 'What is it?')")
    summary = {"final_model": str(final), "accuracy": report["accuracy"], "tasks": report["tasks"],
               "timings_s": timings, "stage_times_s": stage_times, "total_s": time.perf_counter() - start,
               "budget": None if budget is None else {"minutes": minutes, **budget.state},
               "chat": [{"question": question, "answer": answer, "truth": record["answer"]},
                        {"question": question_m, "thinking": thought, "answer": boxed,
                         "truth": record_m["answer"]}]}
    (Path(run_cfg.run_dir) / "demo_report.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _budget(run_cfg, minutes: float, start: float, procs: int):
    """The demo's time budget: probes this machine's speed, prints the prediction. With several processes the
    steps are scaled once, up front (the stages then run under torchrun, out of this process's reach)."""
    from .recipes.tiny import TINY_REFERENCE
    from .train.budget import Budget, speed_probe

    path = Path(run_cfg.run_dir) / "budget.json"
    budget = Budget(minutes * 60, TINY_REFERENCE, path, start, probe_s=speed_probe(run_cfg.model))
    full = budget.predicted_s(run_cfg.stages)
    factors = budget.factors(run_cfg.stages)
    plan = (f"the VLM stages grow to {max(factors):.2f}x their steps" if max(factors) > 1 else
            f"steps scaled by {min(factors):.2f}" if min(factors) < 1 else "the recipe runs whole")
    print(f"[demo] time budget {minutes:g} min: this machine takes {budget.speed:.2f}x the reference's step time "
          f"now; the recipe's training would take ~{full:.0f}s, {time.perf_counter() - start:.0f}s are spent; "
          f"{plan} for now (stages re-planned as they start)")
    if procs > 1:
        run_cfg.stages = budget.plan_all(run_cfg.stages)
        return None
    return budget


def _train(run_cfg, resume: bool, procs: int) -> Path:
    """Train under torchrun with `procs` processes on the same global batches: each rank takes 1/procs of
    every step's rows (and images); returns the last stage's model directory."""
    for stage in run_cfg.stages:
        if stage.rows_per_step % procs:
            raise ValueError(f"stage {stage.name}: {stage.rows_per_step} rows per step do not split over {procs} "
                             f"processes; use --procs 1")
        stage.rows_per_step //= procs
    run_cfg.parallel = "ddp"
    cfg = Path(run_cfg.run_dir).parent / f"{run_cfg.name}.torchrun.json"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(json.dumps(run_cfg.to_dict(), indent=2) + "\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
           "-m", "sailvl", "train", str(cfg), *(["--resume"] if resume else [])]
    print(f"[demo] training with {procs} processes: {' '.join(cmd[2:])}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if subprocess.run(cmd, env=env).returncode != 0:
        raise RuntimeError("training failed (see above); continue it with `sailvl demo --resume`")
    last = len(run_cfg.stages) - 1
    return Path(run_cfg.run_dir) / f"{last:02d}_{run_cfg.stages[last].name}" / "model"


def _stage_times(run_dir: Path) -> dict[str, float]:
    """Seconds per stage, summed from the per-step wall times in metrics.jsonl."""
    times: dict[str, float] = {}
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r.get("tokens_per_s"):
                step_time = r["tokens"] / r["tokens_per_s"]
            else:  # vision stages count images
                step_time = r["images"] / r["images_per_s"] if r.get("images_per_s") else 0.0
            times[r["stage"]] = times.get(r["stage"], 0.0) + step_time
    return times
