"""Evaluation overhead: items/s of the metric functions and of the runner's bookkeeping (loading items,
building prompts, extracting answers, scoring, appending results, summarising; the model's time
excluded by an instant backend), on 10k items, next to the reference that matters: how many items/s the
tiny demo model answers (greedy, 16 new tokens, batches of 32). Overhead per item should stay far below
the model's time per item.

Run: .venv/bin/python benchmarks/bench_eval.py [--quick] [--items 10000]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from itertools import count
from pathlib import Path

import torch
from common import compare, print_table  # benchmarks/ is on sys.path when this file runs as a script

from sailvl.eval import metrics as M
from sailvl.eval.backends import Completion
from sailvl.eval.runner import run_task
from sailvl.eval.tasks import resolve_tasks

WORDS = ["the", "a", "red", "blue", "two", "3", "stop", "sign", "1,000", "yes", "no", "cat", "don't", "42%", "7.5",
         "circle", "square", "left", "right"]


def phrase(rng: random.Random, k: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(k))


class Instant:
    """A backend that answers at once (the option text or the question's first word)."""

    name = "instant"

    def generate(self, requests, settings, think):
        return [Completion(text="The answer is " + r.prompt.split()[0]) for r in requests]


def write_items(path: Path, n: int, rng: random.Random, choice: bool) -> None:
    with open(path, "w") as f:
        for i in range(n):
            rec = {"id": f"q{i}", "question": f"{rng.choice(WORDS)} {phrase(rng, 8)}?", "answer": rng.choice(WORDS),
                   "category": f"c{i % 5}"}
            if choice:
                rec["options"] = {k: phrase(rng, 3) for k in "ABCD"}
                rec["answer"] = rng.choice("ABCD")
            f.write(json.dumps(rec) + "\n")


def model_items_per_s(n: int) -> float:
    """Items/s of the tiny demo-sized model answering 64-px image questions (greedy, 16 new tokens)."""
    from sailvl.config import tiny_config
    from sailvl.model.generate import GenerationConfig, generate
    from sailvl.model.vlm import SailVL

    cfg = tiny_config(vocab_size=2048)
    cfg.img_context_token_id = 7
    model = SailVL(cfg).eval()
    prompt = [11] * 20 + [7] * 16 + [12] * 20  # one 64-px tile = 16 image tokens
    gen = GenerationConfig(max_new_tokens=16)  # no stop tokens: always 16
    batch = 32

    def run():
        with torch.no_grad():
            for _ in range(0, n, batch):
                generate(model, [prompt] * batch, gen, pixel_values=torch.randn(batch, 3, 64, 64))

    return n / compare({"model": run}, warmup=1, repeat=2)["model"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="1k items, one repeat")
    ap.add_argument("--items", type=int, default=10_000)
    args = ap.parse_args()
    n = 1_000 if args.quick else args.items
    repeat = 1 if args.quick else 3
    rng = random.Random(0)

    preds = [phrase(rng, rng.randint(1, 4)) for _ in range(n)]
    vqa_answers = [[phrase(rng, rng.randint(1, 3)) for _ in range(10)] for _ in range(n)]
    doc_answers = [[phrase(rng, rng.randint(2, 5)) for _ in range(rng.randint(1, 3))] for _ in range(n)]
    nums = [f"{rng.uniform(0, 200):.1f}" + rng.choice(["", "%"]) for _ in range(n)]
    options = {k: phrase(rng, 3) for k in "ABCD"}
    replies = [rng.choice(["B", "(C)", "The answer is D.", options["A"], phrase(rng, 12)]) for _ in range(n)]
    boxed = [f"<think>{phrase(rng, 30)}</think> so \\boxed{{{rng.randint(0, 99)}}}" for _ in range(n)]
    metric_fns = {
        "vqa_accuracy (10 answers)": lambda: [M.vqa_accuracy(p, a) for p, a in zip(preds, vqa_answers)],
        "anls (1-3 answers)": lambda: [M.anls(p, a) for p, a in zip(preds, doc_answers)],
        "relaxed_accuracy": lambda: [M.relaxed_accuracy(p, [a]) for p, a in zip(nums, reversed(nums))],
        "ocrbench_hit": lambda: [M.ocrbench_hit(p, a, "Scene Text-centric VQA") for p, a in zip(preds, doc_answers)],
        "extract_choice": lambda: [M.extract_choice(r, options) for r in replies],
        "extract_boxed": lambda: [M.extract_boxed(b) for b in boxed],
        "exact_match": lambda: [M.exact_match(p, a[0]) for p, a in zip(preds, doc_answers)],
    }
    times = compare(metric_fns, warmup=1, repeat=repeat)
    rows = [[name, n, n / t, 1e6 * t / n] for name, t in times.items()]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_items(tmp / "short.jsonl", n, rng, choice=False)
        write_items(tmp / "mcq.jsonl", n, rng, choice=True)
        (short,), (mcq,) = resolve_tasks(str(tmp / "short.jsonl")), resolve_tasks(str(tmp / "mcq.jsonl"))
        fresh = count()
        resumed_dir = tmp / "resumed"
        run_task(Instant(), short, resumed_dir, batch_size=32, progress=False)
        runner_fns = {
            "runner: short answers, fresh run": lambda: run_task(Instant(), short, tmp / f"r{next(fresh)}",
                                                                 batch_size=32, progress=False),
            "runner: multiple choice, fresh run": lambda: run_task(Instant(), mcq, tmp / f"r{next(fresh)}",
                                                                   batch_size=32, progress=False),
            "runner: resume, all items done": lambda: run_task(Instant(), short, resumed_dir, batch_size=32,
                                                               progress=False),
        }
        times = compare(runner_fns, warmup=1, repeat=repeat)
        rows += [[name, n, n / t, 1e6 * t / n] for name, t in times.items()]

    m = 64 if args.quick else 256
    rate = model_items_per_s(m)
    rows.append(["reference: tiny model answering (16 tokens)", m, rate, 1e6 / rate])
    print_table(f"evaluation overhead on {n:,} items (model time excluded)", ["what", "items", "items/s", "us/item"],
                rows)


if __name__ == "__main__":
    main()
