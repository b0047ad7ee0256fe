"""From a recipe name and `key=value` overrides to a finished run (what `sailvl train` calls)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

from ..config import apply_overrides
from ..model.vlm import SailVL
from .stages import MODULE_GROUPS, RunConfig


def build_run(recipe: str, overrides: list[str] = ()) -> RunConfig:
    """Recipe arguments (`scale=0.5`) go to the recipe function; dotted keys go to the RunConfig.
    `recipe` may also be a run config JSON file (e.g. a run directory's run.json)."""
    from ..recipes import get_recipe

    if recipe.endswith(".json"):
        path = Path(recipe)
        if not path.exists():
            raise ValueError(f"run config {recipe} does not exist")
        run = RunConfig.from_dict(json.loads(path.read_text()))
        apply_overrides(run, list(overrides))
        return RunConfig.from_dict(json.loads(json.dumps(run.to_dict())))
    fn = get_recipe(recipe)
    params = inspect.signature(fn).parameters
    kwargs, rest = {}, []
    for item in overrides:
        key, _, raw = item.partition("=")
        if key in params and "." not in key:
            try:
                kwargs[key] = json.loads(raw)
            except json.JSONDecodeError:
                kwargs[key] = raw
        else:
            rest.append(item)
    run = fn(**kwargs)
    apply_overrides(run, rest)
    return RunConfig.from_dict(json.loads(json.dumps(run.to_dict())))  # re-validate after overrides


def describe(run: RunConfig) -> str:
    """Shapes, parameter counts per module group and per stage: validates a recipe without running it."""
    from ..config import SailVLConfig

    cfg = run.model if run.model is not None else SailVLConfig.load(Path(run.init) / "config.json")
    with torch.device("meta"):
        model = SailVL(cfg)
    lines = [f"run {run.name}: {len(run.stages)} stages -> {run.run_dir}"]
    counts = {g: sum(p.numel() for n, p in model.named_parameters() if n.startswith(pre))
              for g, pre in MODULE_GROUPS.items()}
    total = sum(counts.values())
    v, lm = cfg.vision_config, cfg.llm_config
    lines.append(f"vision: {v.num_hidden_layers} x {v.hidden_size} ({v.position_embedding}), patch {v.patch_size}, "
                 f"{cfg.force_image_size} px tiles -> {cfg.tokens_per_tile} tokens per tile")
    kind = f"MoE {lm.num_experts} experts top-{lm.num_experts_per_tok}" if lm.is_moe else "dense"
    lines.append(f"llm: {lm.num_hidden_layers} x {lm.hidden_size}, {lm.num_attention_heads}/{lm.num_key_value_heads} "
                 f"heads, {kind}, vocab {lm.vocab_size}")
    lines.append("parameters: " + ", ".join(f"{g} {n / 1e6:,.1f}M" for g, n in counts.items())
                 + f", total {total / 1e6:,.1f}M")
    for s in run.stages:
        trainable = sum(p.numel() for n, p in model.named_parameters() if s.is_trainable(n))
        lines.append(f"  {s.name:<20} {s.steps:>7} steps  train {','.join(s.trainable):<16} "
                     f"{trainable / 1e6:>10,.1f}M params  tokens/step {s.max_len * s.rows_per_step * s.grad_accum:,}"
                     f"  data {', '.join(Path(d.path).name for d in s.data)}")
    return "\n".join(lines)


def train_recipe(recipe: str, overrides: list[str] = (), resume: bool = False, quiet: bool = False) -> Path:
    from .. import distributed as D
    from ..recipes import PREPARE
    from .trainer import Trainer, pick_device

    run = build_run(recipe, overrides)
    D.init_from_env(pick_device(run.device))
    if recipe in PREPARE:
        if D.is_main():
            PREPARE[recipe](run)
        D.barrier()
    return Trainer(run, resume=resume, quiet=quiet).fit()
