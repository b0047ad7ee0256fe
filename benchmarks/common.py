"""Shared helpers for the benchmarks: interleaved timing with warm-up, a printed table of ratios, and training
one short run to score its model on held-out records."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import torch

# Qwen3 shapes shared by the LLM and decode benchmarks.
QWEN3_CONFIGS = {
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, vocab_size=4096),
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=64, vocab_size=16384),
}


def compare(fns: dict, warmup: int = 2, repeat: int = 7) -> dict[str, float]:
    """Best-of-`repeat` wall seconds per function. Runs are interleaved (A B A B ...) so that slow phases
    of a shared machine hit every contender alike; the minimum is the least-disturbed run."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n## {title}  (torch {torch.__version__}, {torch.get_num_threads()} threads)\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        print("| " + " | ".join(f"{x:,.0f}" if isinstance(x, float) and abs(x) >= 100 else
                                (f"{x:.2f}" if isinstance(x, float) else str(x)) for x in r) + " |")


def fresh_on_tower(tower: str, out: Path, std: float | None = None, overrides: list[str] = ()) -> Path:
    """A model directory at `out`: the ViT of the model directory `tower`, adapter and LLM drawn afresh (seed 0;
    LLM init std `std`, or the tower's config's), with the tower's processor and tokenizer. `overrides` edit the
    model config first (`sailvl.config.apply_overrides`: `visual_position_code=0.3`, `llm_config.head_dim=32`).
    With no shape change (and no `std`) the fresh adapter and LLM are the tower run's own initial weights, which
    a run of seed 0 also draws first."""
    import dataclasses

    from sailvl.config import SailVLConfig, apply_overrides
    from sailvl.data.processor import Processor
    from sailvl.model.vlm import SailVL

    base = SailVL.from_pretrained(tower, dtype=torch.float32)
    cfg = base.config
    if std is not None:
        cfg = dataclasses.replace(cfg, llm_config=dataclasses.replace(cfg.llm_config, initializer_range=std))
    if overrides:  # through a dict and back, so the edited config is validated like a loaded one
        cfg = SailVLConfig.from_dict(apply_overrides(SailVLConfig.from_dict(cfg.to_dict()), list(overrides)).to_dict())
    torch.manual_seed(0)
    model = SailVL(cfg)
    model.vision_model.load_state_dict(base.vision_model.state_dict())
    model.save_pretrained(out)
    Processor.from_pretrained(tower).save_pretrained(out, source_dir=tower)
    return out


def probe_run(name: str, train: Path, init: Path, work: Path, steps: int, optimizer: str = "adamw"):
    """A one-stage sailvl RunConfig: adapter + LLM from `init` on the JSONL `train`, `steps` steps of 2 x 512
    tokens as the tiny recipe's VLM stages take them (lr 1e-3, sqrt loss weighting), bf16, no checkpoints."""
    from sailvl.train.stages import DataSpec, RunConfig, Stage

    stage = Stage(name, steps, [DataSpec(str(train), 1.0, name)], lr={"adapter": 1e-3, "llm": 1e-3},
                  trainable=["adapter", "llm"], max_len=512, rows_per_step=2, warmup_steps=10, schedule="constant",
                  loss_weighting="sqrt", optimizer=optimizer)
    return RunConfig(name=name, stages=[stage], out_dir=str(work), init=str(init), model=None, precision="bf16",
                     checkpoint_every=10**9, log_every=10**9)


def train_and_score(run, test: Path, out: Path, group_of) -> tuple[float, dict, float]:
    """Train `run` (a sailvl RunConfig), score its final model on the one-task JSONL `test` (per-item results to
    `out`) -> (accuracy, {group_of(record): mean score}, training seconds)."""
    from sailvl import load
    from sailvl.eval.synth import evaluate
    from sailvl.train.trainer import Trainer

    t0 = time.perf_counter()
    final = Trainer(run, quiet=True).fit()
    seconds = time.perf_counter() - t0
    pipe = load(final)
    rep = evaluate(pipe.model, pipe.processor, test, out_jsonl=out)
    groups = defaultdict(list)
    records = test.read_text().splitlines()
    for record, line in zip(records, out.read_text().splitlines()):  # one task: results keep the file's order
        groups[group_of(json.loads(record))].append(json.loads(line)["score"])
    return rep["accuracy"], {g: sum(v) / len(v) for g, v in sorted(groups.items())}, seconds
