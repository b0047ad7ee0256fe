"""`sailvl eval` (registered by sailvl.cli): parse flags, build the backend, judge and tasks, run, print."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _default_out(args) -> Path:
    """runs/eval/<model>: the model directory's name (its parent's for a stage's .../model), or the API model."""
    if args.model is not None:
        p = Path(args.model).resolve()
        name = p.parent.name if p.name == "model" else p.name
    else:
        name = args.api_model.replace("/", "_")
    return Path("runs") / "eval" / name


def _eval(args) -> int:
    from .backends import EndpointModel, LocalModel
    from .endpoint import ChatClient, EndpointError
    from .judge import Judge
    from .runner import overview_table, run_tasks, task_table
    from .tasks import known_tasks, resolve_tasks

    if args.list_tasks:
        print("\n".join(known_tasks()))
        return 0
    if not args.task:
        raise ValueError("--task is required (a built-in name, see --list-tasks, or a .tsv / .jsonl / .json file)")
    if (args.model is None) == (args.endpoint is None):
        raise ValueError("give exactly one of --model DIR or --endpoint URL")
    if args.endpoint is not None and not args.api_model:
        raise ValueError("--endpoint needs --api-model NAME (the model name the server serves)")
    if (args.judge_endpoint is None) != (args.judge_model is None):
        raise ValueError("--judge-endpoint and --judge-model go together")
    if args.data and len([t for t in args.task if not t.startswith("synth")]) > 1:
        raise ValueError("--data names one data file; give it with one task (VLMEvalKit TSVs can also be found "
                         "by name under $LMUData)")
    specs = [s for name in args.task for s in resolve_tasks(name, data=args.data, metric=args.metric)]
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    if args.model is not None:
        backend = LocalModel(args.model)
    else:
        backend = EndpointModel(args.endpoint, args.api_model, api_key=api_key, concurrency=args.batch_size)
    judge = None
    if args.judge_endpoint is not None:
        judge = Judge(ChatClient(args.judge_endpoint, args.judge_model, api_key=args.judge_api_key or api_key))
    out = Path(args.out) if args.out else _default_out(args)
    try:
        summaries = run_tasks(backend, specs, out, think=args.think, limit=args.limit, batch_size=args.batch_size,
                              judge=judge, max_new_tokens=args.max_new_tokens, progress=not args.quiet)
    except EndpointError as e:
        print(f"sailvl eval: error: {e}\nfinished items are saved; run the same command again to resume",
              file=sys.stderr)
        return 1
    print(overview_table(summaries))
    if len(summaries) == 1:
        print("\n" + task_table(summaries[0]))
    print(f"\nper-item results, summaries and tables under {out}/ (summary.md, <task>/results.jsonl)")
    return 0


def add_parsers(sub) -> None:
    """Register this subsystem's subcommands on the top-level subparsers."""
    e = sub.add_parser("eval", help="evaluate a model directory or an OpenAI-compatible endpoint on tasks",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=(
                           "Tasks: synth, synth/<ability>, MMStar, OCRBench, ChartQA_TEST, DocVQA_VAL, TextVQA_VAL "
                           "(VLMEvalKit TSVs\nfrom --data or $LMUData), or a .tsv / .jsonl / .json task file. "
                           "Re-running the same command resumes."))
    e.add_argument("--model", default=None, help="a SAIL-VL2 model directory")
    e.add_argument("--endpoint", default=None, help="an OpenAI-compatible server URL (http://host:port[/v1])")
    e.add_argument("--api-model", default=None, help="the model name to request from --endpoint")
    e.add_argument("--api-key", default=None, help="bearer token for --endpoint (default: $OPENAI_API_KEY)")
    e.add_argument("--task", nargs="+", default=None, help="task names or files (several allowed)")
    e.add_argument("--data", default=None, help="data file for the task(s) (e.g. /data/MMStar.tsv)")
    e.add_argument("--metric", default=None, help="override the task's metric (e.g. anls, accuracy)")
    e.add_argument("--limit", type=int, default=None, help="only the first N items of each task")
    e.add_argument("--think", action="store_true", help="thinking mode (reason in <think>, answer in \\boxed{})")
    e.add_argument("--out", default=None, help="output directory (default runs/eval/<model name>)")
    e.add_argument("--batch-size", type=int, default=8, help="items per batch (concurrent requests for endpoints)")
    e.add_argument("--max-new-tokens", type=int, default=None, help="override the task's token budget")
    e.add_argument("--judge-endpoint", default=None, help="OpenAI-compatible judge for answers rules cannot extract")
    e.add_argument("--judge-model", default=None, help="the judge's model name")
    e.add_argument("--judge-api-key", default=None, help="bearer token for the judge (default: --api-key)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.add_argument("--list-tasks", action="store_true", help="list the built-in task names and exit")
    e.set_defaults(func=_eval)
