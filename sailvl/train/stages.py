"""Run and stage configs: a training stage is data, not a script.

A `RunConfig` names the starting model (a new one from a `SailVLConfig`, or an existing SAIL-VL2
directory), the tokenizer, processor settings and an ordered list of `Stage`s. Each stage says which
modules train, the lr of each module group, the optimiser and schedule, the data mixture, the row length
for packing, the loss weighting, optional AdaLRS, the number of steps and what it starts from. One
trainer runs every stage. Configs round-trip through JSON (`to_dict` / `from_dict`) and take dotted
overrides (`stages.align.steps=50`, see `sailvl.config.apply_overrides`).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from ..config import SailVLConfig

MODULE_GROUPS = {"vit": "vision_model.", "adapter": "mlp1.", "llm": "language_model."}


@dataclass
class DataSpec:
    path: str
    weight: float = 1.0
    name: str | None = None


@dataclass
class Stage:
    name: str
    steps: int
    data: list[DataSpec]
    trainable: list[str] = field(default_factory=lambda: ["vit", "adapter", "llm"])
    lr: dict[str, float] = field(default_factory=lambda: {"vit": 1e-5, "adapter": 1e-4, "llm": 1e-5})
    schedule: str = "cosine"  # "cosine" (warmup + cosine), "wsd" (warmup-stable-decay), "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # WSD: share of steps in the final linear decay
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    # "adamw", or "muon": Muon for the hidden weight matrices, AdamW for the rest (sailvl.train.muon)
    optimizer: str = "adamw"
    max_len: int = 2048  # tokens per packed row (also the processor's max sample length)
    rows_per_step: int = 1  # packed rows per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    loss_weighting: str = "token"  # "token" | "sample" | "sqrt"
    adalrs: dict[str, Any] | None = None  # AdaLRSConfig fields; None = off
    init_from: str | None = None  # None: the previous stage (or the run's start); a stage name; or a model dir
    max_dynamic_patch: int | None = None  # per-stage tile limit override for the processor
    # "vlm": next-token loss on the data mixture. "vision": SAIL-ViT pretraining of the ViT alone on dense
    # per-patch labels of the synthetic world, generated in memory (sailvl.train.vision); `data` is unused,
    # `rows_per_step` is images per step and `vision` holds {"world": World fields, "kinds": weights}.
    kind: str = "vlm"
    vision: dict[str, Any] | None = None
    # attention supervision (sailvl.train.focus): {"weight": w, "layers": [i, ...], "head": h}. Samples whose records
    # name `focus` boxes (the objects their first answer is about) add w x -log(the attention mass that head h of
    # each listed LLM layer puts on the image tokens covering those boxes, at the position predicting the answer)
    focus: dict[str, Any] | None = None

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"stage {self.name!r}: steps must be >= 0")
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise ValueError(f"stage {self.name!r}: schedule must be cosine, wsd or constant, got {self.schedule!r}")
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"stage {self.name!r}: optimizer must be adamw or muon, got {self.optimizer!r}")
        if self.loss_weighting not in ("token", "sample", "sqrt"):
            raise ValueError(f"stage {self.name!r}: loss_weighting must be token, sample or sqrt")
        for t in self.trainable:
            if t not in MODULE_GROUPS and not any(t.startswith(p) for p in MODULE_GROUPS.values()):
                raise ValueError(f"stage {self.name!r}: trainable {t!r} is not one of {sorted(MODULE_GROUPS)} "
                                 f"or a parameter-name prefix (e.g. 'language_model.model.layers.0.')")
        if self.kind not in ("vlm", "vision"):
            raise ValueError(f"stage {self.name!r}: kind must be vlm or vision, got {self.kind!r}")
        if self.focus is not None:
            unknown = set(self.focus) - {"weight", "layers", "head"}
            if unknown or "weight" not in self.focus or not self.focus.get("layers"):
                raise ValueError(f"stage {self.name!r}: focus must be {{'weight': w, 'layers': [...], 'head': h}}, "
                                 f"got {self.focus!r}")
        if not self.data and self.steps and self.kind == "vlm":
            raise ValueError(f"stage {self.name!r} has no data")

    def lr_for(self, param_name: str) -> float:
        """The lr of a parameter: the longest matching key of `lr` (group name or name prefix)."""
        best, best_len = None, -1
        for key, value in self.lr.items():
            prefix = MODULE_GROUPS.get(key, key)
            if param_name.startswith(prefix) and len(prefix) > best_len:
                best, best_len = value, len(prefix)
        if best is None:
            raise ValueError(f"stage {self.name!r}: no lr for trainable parameter {param_name}")
        return float(best)

    def is_trainable(self, param_name: str) -> bool:
        return any(param_name.startswith(MODULE_GROUPS.get(t, t)) for t in self.trainable)


@dataclass
class RunConfig:
    name: str
    stages: list[Stage]
    out_dir: str = "runs"
    model: SailVLConfig | None = None  # a fresh model from this config ...
    init: str | None = None  # ... or an existing SAIL-VL2 model directory
    tokenizer: str | None = None  # directory with tokenizer.json (defaults to `init`)
    processor: dict[str, Any] = field(default_factory=dict)  # ProcessorConfig overrides
    seed: int = 0
    precision: str = "bf16"  # "bf16" autocast or "fp32"
    grad_clip: float = 1.0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    activation_checkpointing: bool = False
    # several ranks: every rank packs the global step's rows and trains on its share, chosen so vision tokens
    # per rank are balanced (SAIL-VL2's visual packing); False: each rank packs its own shard of the data
    visual_packing: bool = True
    # several ranks: "fsdp" shards every block over the ranks (FSDP2); "ddp" keeps the whole model on every rank
    # and all-reduces the gradients once per step (faster than fsdp for small models: benchmarks/bench_parallel.py)
    parallel: str = "fsdp"
    device: str = "auto"

    def __post_init__(self):
        if (self.model is None) == (self.init is None):
            raise ValueError("a run needs exactly one of `model` (a new model config) or `init` (a model directory)")
        if self.parallel not in ("fsdp", "ddp"):
            raise ValueError(f"parallel must be 'fsdp' or 'ddp', got {self.parallel!r}")
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"precision must be bf16 or fp32, got {self.precision!r}")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")

    @property
    def run_dir(self) -> str:
        return f"{self.out_dir}/{self.name}"

    def to_dict(self) -> dict:
        d = to_dict(self)
        if self.model is not None:
            d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        d = dict(d)
        model = SailVLConfig.from_dict(d.pop("model")) if d.get("model") else None
        d.pop("model", None)
        return from_dict(cls, {**d, "model": None}, model=model)


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def from_dict(cls, d: dict, **given) -> Any:
    """Build a (nested) dataclass from a dict, checking for unknown keys."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}")
    kwargs = {}
    for k, v in d.items():
        if k in given:
            kwargs[k] = given[k]
            continue
        hint = hints[k]
        args = typing.get_args(hint)
        if typing.get_origin(hint) is list and args and dataclasses.is_dataclass(args[0]):
            v = [from_dict(args[0], x) if isinstance(x, dict) else x for x in v]
        elif dataclasses.is_dataclass(hint) and isinstance(v, dict):
            v = from_dict(hint, v)
        elif typing.get_origin(hint) is tuple and isinstance(v, list):
            v = tuple(v)
        kwargs[k] = v
    return cls(**kwargs)
