"""Optimiser construction for a stage, and the lr schedules.

Freezing is `requires_grad=False` outside the stage's trainable modules (frozen parameters get no
gradient, no optimiser state and no FSDP communication for their grads). Trainable parameters are grouped
by their lr (the longest matching key of `stage.lr`); no weight decay on norms, biases and embeddings of
positions. A stage's `optimizer` is "adamw" (torch's fused AdamW) or "muon" (`sailvl.train.muon.MuonAdamW`:
Muon for the hidden matrices, AdamW for the rest, the same lrs). `lr_at(stage, step)` is the schedule's multiplier in [0, 1]; the trainer sets every group's lr to
`base_lr * lr_at(...) * adalrs_scale` before each step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .muon import MuonAdamW, use_muon
from .stages import Stage


def apply_trainable(model: nn.Module, stage: Stage) -> tuple[int, int]:
    """Set requires_grad by the stage's trainable list. Returns (trainable, total) parameter counts."""
    n_train = n_total = 0
    for name, p in model.named_parameters():
        p.requires_grad_(stage.is_trainable(name))
        n_total += p.numel()
        n_train += p.numel() if p.requires_grad else 0
    if n_train == 0:
        raise ValueError(f"stage {stage.name!r} trains nothing (trainable={stage.trainable})")
    return n_train, n_total


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return p.dim() < 2 or name.endswith("pos_embed")


def build_optimizer(model: nn.Module, stage: Stage) -> torch.optim.Optimizer:
    muon = stage.optimizer == "muon"
    groups: dict[tuple[float, bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = (stage.lr_for(name), _no_decay(name, p), muon and use_muon(name, p))
            groups.setdefault(key, []).append(p)
    param_groups = [{"params": ps, "base_lr": lr, "lr": lr, "weight_decay": 0.0 if nd else stage.weight_decay}
                    | ({"muon": m} if muon else {})
                    for (lr, nd, m), ps in sorted(groups.items(), key=lambda kv: kv[0])]
    if muon:
        return MuonAdamW(param_groups, betas=tuple(stage.betas))
    # the fused kernel on CPU too: 18 -> 6.5 ms per tiny-recipe step (benchmarks/bench_step.py's what-if table)
    devices = {p.device.type for g in param_groups for p in g["params"]}
    fused = True if devices <= {"cpu", "cuda"} else None
    return torch.optim.AdamW(param_groups, betas=tuple(stage.betas), fused=fused)


def lr_at(stage: Stage, step: int) -> float:
    """Schedule multiplier for optimiser step `step` (0-based)."""
    total, warm = max(stage.steps, 1), stage.warmup_steps
    if warm and step < warm:
        return (step + 1) / warm
    floor = stage.min_lr_ratio
    if stage.schedule == "constant":
        return 1.0
    if stage.schedule == "cosine":
        progress = (step - warm) / max(total - warm, 1)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    decay_start = total - int(round(stage.decay_fraction * total))  # WSD
    if step < decay_start:
        return 1.0
    return 1.0 - (1.0 - floor) * (step - decay_start + 1) / max(total - decay_start, 1)


def set_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * multiplier
