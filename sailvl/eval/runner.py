"""The evaluation runner: tasks x a backend -> per-item results, summaries and tables, resumably.

For each task, under OUT/<task>[-think]/:
  - results.jsonl  one line per answered item: id, prompt, raw output, extracted answer (and whether a
                   rule or the judge extracted it), gold answers, category, score, error (if any);
                   appended batch by batch, so a killed run loses at most the batch in flight;
  - run.json       what the results were made with (model, task version, prompt template, parser, metric,
                   generation settings, thinking, judge); re-running with the same settings continues
                   where it stopped (finished items are not asked again; items that ended in an error are
                   retried), with different settings it is an error;
  - summary.json / summary.md   the score overall and per category, counts, the share of answers the
                   rules extracted and the number of items the judge was asked about.
`run_tasks` also writes OUT/summary.json and OUT/summary.md over all the tasks of the run.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

from .backends import Backend, Request
from .items import EvalItem
from .judge import Judge
from .metrics import circular_hit
from .tasks import TaskSpec, build_prompt, load_items, parse_answer, score

RESULTS, RUN, SUMMARY_JSON, SUMMARY_MD = "results.jsonl", "run.json", "summary.json", "summary.md"


def task_dir(out_dir: str | Path, spec: TaskSpec, think: bool) -> Path:
    return Path(out_dir) / (spec.name.replace("/", "-") + ("-think" if think else ""))


def read_results(path: Path) -> dict[str, dict]:
    """The last record per item id; a line torn by a kill mid-write is ignored."""
    records: dict[str, dict] = {}
    if path.exists():
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and "id" in rec:
                    records[rec["id"]] = rec
    return records


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1) == b"\n"


def _check_run_config(path: Path, config: dict) -> None:
    if not path.exists():
        path.write_text(json.dumps(config, indent=2) + "\n")
        return
    old = json.loads(path.read_text())
    diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
    if diff:
        details = "; ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in diff)
        raise ValueError(f"{path.parent} holds results made with other settings ({details}); use another --out "
                         f"or delete that directory")


class _PlainProgress:
    """A progress line on stderr when tqdm is not installed."""

    def __init__(self, total: int, initial: int, desc: str):
        self.n, self.total, self.desc = initial, total, desc

    def update(self, k: int) -> None:
        self.n += k
        print(f"\r{self.desc}: {self.n}/{self.total}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        print(file=sys.stderr)


def _progress(total: int, initial: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainProgress(total, initial, desc)
    return tqdm(total=total, initial=initial, desc=desc, unit="item", file=sys.stderr)


def _record(spec: TaskSpec, item: EvalItem, prompt: str, completion, think: bool, judge: Judge | None) -> dict:
    rec = {"id": item.id, "prompt": prompt, "output": completion.text, "answer": None, "extracted_by": None,
           "gold": item.answers, "category": item.category, "score": 0.0}
    if "circular_of" in item.meta:
        rec["circular_of"] = item.meta["circular_of"]
    if completion.error is not None:
        rec["error"] = completion.error
        return rec
    answer = parse_answer(spec, completion.text, item, think)
    if answer is not None:
        rec["extracted_by"] = "rule"
    elif judge is not None:
        rec["judge_asked"] = True
        answer = judge.extract(item, completion.text, choice=spec.parser == "choice")
        rec["extracted_by"] = "judge" if answer is not None else None
    rec["answer"], rec["score"] = answer, score(spec, answer, item)
    return rec


def run_task(backend: Backend, spec: TaskSpec, out_dir: str | Path, *, think: bool = False, limit: int | None = None,
             batch_size: int = 8, judge: Judge | None = None, max_new_tokens: int | None = None,
             progress: bool = True) -> dict:
    """Evaluate one task (continuing an earlier run in the same directory) and return its summary."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    t0 = time.perf_counter()
    items, skipped = load_items(spec, work_dir=out_dir, limit=limit)
    settings = spec.generation
    if max_new_tokens is not None:
        field = "thinking_max_new_tokens" if think else "max_new_tokens"
        settings = dataclasses.replace(settings, **{field: max_new_tokens})
    tdir = task_dir(out_dir, spec, think)
    tdir.mkdir(parents=True, exist_ok=True)
    config = {"task": spec.name, "version": spec.version, "model": backend.name, "think": think,
              "prompt_template": spec.prompt, "parser": spec.parser, "metric": spec.metric,
              "circular": spec.circular, "generation": dataclasses.asdict(settings),
              "judge": judge.describe() if judge is not None else None}
    _check_run_config(tdir / RUN, config)
    records = read_results(tdir / RESULTS)
    pending = [it for it in items if it.id not in records or "error" in records[it.id]]
    bar = _progress(len(items), len(items) - len(pending), spec.name) if progress and pending else None
    try:
        with open(tdir / RESULTS, "a", encoding="utf-8") as f:
            if f.tell() and not _ends_with_newline(tdir / RESULTS):
                f.write("\n")  # after a line torn by a kill, start a fresh one
            for start in range(0, len(pending), batch_size):
                chunk = pending[start:start + batch_size]
                prompts = [build_prompt(spec, it, think) for it in chunk]
                completions = backend.generate([Request(p, it.images, it.video, it.history)
                                                for p, it in zip(prompts, chunk)], settings, think)
                lines = []
                for it, p, c in zip(chunk, prompts, completions):
                    rec = _record(spec, it, p, c, think, judge)
                    records[it.id] = rec
                    lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
                f.write("".join(lines))
                f.flush()
                if bar is not None:
                    bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    summary = summarize(spec, items, records, config, skipped)
    summary["data"] = spec.data or str(Path(out_dir) / "synth-data" / "test.jsonl")
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    (tdir / SUMMARY_JSON).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    (tdir / SUMMARY_MD).write_text(task_table(summary) + "\n")
    return summary


def summarize(spec: TaskSpec, items: list[EvalItem], records: dict[str, dict], config: dict,
              skipped: list[dict]) -> dict:
    """Scores overall and per category; circular tasks score a question 1 only if all its passes are right."""
    done = [(it, records[it.id]) for it in items if it.id in records]
    expected: dict[str, int] = defaultdict(int)
    for it in items:
        expected[it.meta.get("circular_of", it.id)] += 1
    units: dict[str, list] = defaultdict(list)  # question -> [(category, score) per pass]
    for it, rec in done:
        units[it.meta.get("circular_of", it.id)].append((it.category, rec["score"]))
    # a question counts once all its passes are in; circular ones are right only if every pass is
    unit_scores = {u: (v[0][0], circular_hit([s for _, s in v]) if spec.circular else v[0][1])
                   for u, v in units.items() if len(v) == expected[u]}
    by_cat: dict[str, list[float]] = defaultdict(list)
    for cat, s in unit_scores.values():
        if cat is not None:
            by_cat[cat].append(s)
    answered = [rec for _, rec in done if "error" not in rec]
    scores = [s for _, s in unit_scores.values()]
    return {**config,
            "n_items": len(expected), "n_scored": len(unit_scores), "n_missing": len(expected) - len(unit_scores),
            "n_errors": sum("error" in rec for _, rec in done),
            "score": sum(scores) / len(scores) if scores else 0.0, "total": sum(scores),
            "categories": {c: {"n": len(v), "score": sum(v) / len(v)} for c, v in sorted(by_cat.items())},
            "rule_extracted": (sum(r["extracted_by"] == "rule" for r in answered) / len(answered)) if answered else 0.0,
            "judge_used": sum(bool(r.get("judge_asked")) for r in answered),
            "skipped": skipped}


def task_table(summary: dict) -> str:
    """A markdown table of one task: overall and per category (scores in %)."""
    mode = ", thinking" if summary["think"] else ""
    lines = [f"### {summary['task']} (v{summary['version']}, {summary['metric']}{mode})", "",
             "| category | n | score |", "|---|---|---|",
             f"| **overall** | {summary['n_scored']} | **{100 * summary['score']:.2f}** |"]
    lines += [f"| {c} | {r['n']} | {100 * r['score']:.2f} |" for c, r in summary["categories"].items()]
    notes = [f"model: {summary['model']}", f"rule-extracted answers: {100 * summary['rule_extracted']:.1f}%"]
    if summary["judge"]:
        notes.append(f"judge {summary['judge']['model']} used on {summary['judge_used']} items")
    if summary["n_errors"] or summary["n_missing"] or summary["skipped"]:
        notes.append(f"errors {summary['n_errors']}, missing {summary['n_missing']}, "
                     f"skipped rows {len(summary['skipped'])}")
    return "\n".join(lines + ["", "; ".join(notes)])


def overview_table(summaries: list[dict]) -> str:
    """One row per task (scores in %)."""
    lines = ["| task | metric | n | score | rule-extracted | judge used | errors |", "|---|---|---|---|---|---|---|"]
    for s in summaries:
        name = s["task"] + (" (thinking)" if s["think"] else "")
        lines.append(f"| {name} | {s['metric']} | {s['n_scored']} | {100 * s['score']:.2f} | "
                     f"{100 * s['rule_extracted']:.1f}% | {s['judge_used']} | {s['n_errors']} |")
    return "\n".join(lines)


def run_tasks(backend: Backend, specs: list[TaskSpec], out_dir: str | Path, **kw) -> list[dict]:
    """`run_task` for each spec, then OUT/summary.json and OUT/summary.md over all of them."""
    out_dir = Path(out_dir)
    summaries = [run_task(backend, s, out_dir, **kw) for s in specs]
    (out_dir / SUMMARY_JSON).write_text(json.dumps(summaries, indent=2, ensure_ascii=False) + "\n")
    md = overview_table(summaries) + "\n\n" + "\n\n".join(task_table(s) for s in summaries)
    (out_dir / SUMMARY_MD).write_text(md + "\n")
    return summaries
