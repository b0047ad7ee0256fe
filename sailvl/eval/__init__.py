"""Evaluation: metrics (reference-exact), tasks as data, VLMEvalKit TSV and JSONL readers, local and
endpoint backends, an optional judge, and the resumable runner behind `sailvl eval`.

    metrics.py   per-item scores and answer extraction        tasks.py     TaskSpec, built-in tasks, prompts
    items.py     EvalItem, JSONL question files               tsv.py       VLMEvalKit TSV reader
    backends.py  local model dir / OpenAI-compatible endpoint  endpoint.py  chat-completions client
    judge.py     optional model judge                         runner.py    results, resume, summaries, tables
    synth.py     the demo's in-process synthetic evaluation    cli.py       `sailvl eval`
"""
