"""The built-in synthetic world's test split as an evaluation task (one score per ability), as the demo runs
it in-process. `sailvl eval --task synth` runs the same tasks and scorers through the resumable runner.

Every record carries its task and verifiable answer. Scoring: exact match of the normalised short
answer; the last `\\boxed{}` for thinking tasks; IoU >= 0.5 for grounding; bag-of-words F1 for captions
(reported, but not part of the accuracy average: a caption has no single right answer). Chance is the
accuracy of always answering the task's most common test answer.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import torch

from ..data.sources import JsonlSource
from ..data.template import THINK_END, THINK_SUFFIX, parse_thinking
from ..model.generate import GenerationConfig, generate
from .metrics import exact_match, grounding_hit, token_f1
from .tasks import SYNTH_CAPTION_TASKS as CAPTION_TASKS
from .tasks import SYNTH_THINKING_TASKS as THINKING_TASKS


def score(task: str, prediction: str, answer: str) -> float:
    if task in THINKING_TASKS or THINK_END in prediction:  # scored on the answer: the last \\boxed{}, else the end
        prediction = parse_thinking(prediction)[1]
    if task == "grounding":
        return grounding_hit(prediction, answer)
    if task in CAPTION_TASKS:
        return token_f1(prediction, answer)
    return exact_match(prediction, answer)


def chance(task: str, answers: list[str]) -> float:
    if not answers:
        return 0.0
    top = Counter(a.strip().lower() for a in answers).most_common(1)[0][0]
    return sum(score(task, top, a) for a in answers) / len(answers)


@torch.no_grad()
def evaluate(model, processor, test_jsonl: str | Path, *, limit_per_task: int | None = None, batch_size: int = 32,
             max_new_tokens: int = 32, thinking_tokens: int = 160, out_jsonl: str | Path | None = None,
             progress: bool = False) -> dict:
    """Greedy answers for the test split -> {"tasks": {task: {"n", "score", "chance"}}, "accuracy": mean over
    non-caption tasks}. Per-item results go to out_jsonl when given."""
    src = JsonlSource(test_jsonl)
    by_task: dict[str, list] = defaultdict(list)
    for i in range(len(src)):
        s = src.read(i)
        if limit_per_task is None or len(by_task[s.task]) < limit_per_task:
            by_task[s.task].append(s)
    model.eval()

    def decode(ids):
        return processor.decode(ids, skip_special_tokens=False)

    results = []
    for task, samples in sorted(by_task.items()):
        # the thinking budget for thinking tasks and for questions that ask for thinking
        thinks = task in THINKING_TASKS or any(s.messages[-2]["content"].endswith(THINK_SUFFIX) for s in samples)
        budget = thinking_tokens if thinks else max_new_tokens
        gen = GenerationConfig(max_new_tokens=budget, stop_token_ids=[processor.im_end_id])
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            inputs = [processor(s.messages[:-1], s.images, s.video, add_generation_prompt=True) for s in chunk]
            pixels = [x["pixel_values"] for x in inputs if x["pixel_values"] is not None]
            pixel_values = None
            if pixels:
                if isinstance(pixels[0], torch.Tensor):
                    pixel_values = torch.cat(pixels)
                else:  # native resolution: one list of images
                    pixel_values = [p for group in pixels for p in group]
                if isinstance(pixel_values, torch.Tensor):
                    pixel_values = pixel_values.to(model.device, model.dtype)
            out = generate(model, [x["input_ids"].tolist() for x in inputs], gen, pixel_values=pixel_values,
                           decode=decode)
            for s, text in zip(chunk, out.texts):
                results.append({"task": task, "key": s.key, "answer": s.answer, "output": text,
                                "score": score(task, text, s.answer)})
            if progress:
                print(f"\r  eval {task}: {min(start + batch_size, len(samples))}/{len(samples)}", end="", flush=True)
    if progress:
        print()
    if out_jsonl is not None:
        Path(out_jsonl).write_text("".join(json.dumps(r) + "\n" for r in results))
    tasks = {}
    for task, samples in sorted(by_task.items()):
        scores = [r["score"] for r in results if r["task"] == task]
        tasks[task] = {"n": len(scores), "score": sum(scores) / len(scores),
                       "chance": chance(task, [s.answer for s in samples])}
    qa = [t for t in tasks if t not in CAPTION_TASKS]
    acc = sum(tasks[t]["score"] for t in qa) / len(qa) if qa else 0.0
    return {"tasks": tasks, "accuracy": acc}


def table(report: dict) -> str:
    lines = ["| task | n | score | chance |", "|---|---|---|---|"]
    for task, r in report["tasks"].items():
        kind = " (word F1)" if task in CAPTION_TASKS else ""
        lines.append(f"| {task}{kind} | {r['n']} | {r['score']:.2f} | {r['chance']:.2f} |")
    lines.append(f"| **overall accuracy** (QA tasks) | | **{report['accuracy']:.2f}** | |")
    return "\n".join(lines)
