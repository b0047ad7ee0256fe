"""SAIL-VL2 checkpoint layout: config.json + safetensors (sharded with an index above a size threshold).

Our module names equal the checkpoint key names except MoE experts, which the model stacks into
[E, ...] tensors and the checkpoint keeps one key per expert (`mlp.experts.{e}.gate_proj.weight`).
`to_checkpoint` / `from_checkpoint` are the only place that mapping lives. Loading is strict: a missing
or unexpected key, or a wrong shape, is an error naming it. Only safetensors is read; never pickle.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import SailVLConfig

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_EXPERT_STACKED = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_EXPERT_SPLIT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class CheckpointError(ValueError):
    """A checkpoint directory that does not match the model it claims to hold."""


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {size!r} (use e.g. 5GB, 500MB or a byte count)")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * mult)


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(dtype, dtype)
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"unknown floating dtype {dtype!r}")
    return value


# --------------------------------------------------------------------------------- key mapping
def to_checkpoint(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model state dict -> checkpoint tensors (per-expert [out, in] keys, contiguous, unshared).
    Our experts are input-major: gate_up_proj [E, H, 2I] (gate then up), down_proj [E, I, H]."""
    out = {}
    for key, t in state.items():
        m = _EXPERT_STACKED.match(key)
        if not m:
            out[key] = t.contiguous()
            continue
        prefix = m.group(1)
        for e in range(t.shape[0]):
            w = t[e].T  # [out, in]
            if m.group(2) == "down_proj":
                out[f"{prefix}.{e}.down_proj.weight"] = w.contiguous()
            else:
                gate, up = w.chunk(2, dim=0)
                out[f"{prefix}.{e}.gate_proj.weight"] = gate.contiguous()
                out[f"{prefix}.{e}.up_proj.weight"] = up.contiguous()
    return out


def from_checkpoint(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint tensors -> model state dict (experts stacked). Expert indices must be 0..E-1."""
    out, experts = {}, {}
    for key, t in tensors.items():
        m = _EXPERT_SPLIT.match(key)
        if m:
            experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = t
        else:
            out[key] = t
    n_experts = {}
    for (prefix, _), by_index in experts.items():
        n_experts[prefix] = max(n_experts.get(prefix, 0), max(by_index) + 1)
    missing = [f"{prefix}.{e}.{name}.weight" for prefix, n in n_experts.items()
               for name in ("gate_proj", "up_proj", "down_proj") for e in range(n)
               if e not in experts.get((prefix, name), {})]
    if missing:
        raise CheckpointError(f"missing keys: {missing[:50]}")
    for prefix, n in n_experts.items():
        w = {name: [experts[(prefix, name)][e] for e in range(n)] for name in ("gate_proj", "up_proj", "down_proj")}
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([g, u]).T for g, u in zip(w["gate_proj"], w["up_proj"])])
        out[f"{prefix}.down_proj"] = torch.stack([d.T for d in w["down_proj"]])
    return out


# ------------------------------------------------------------------------------- safetensors I/O
def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, max_shard_size: int | str = "5GB") -> list[str]:
    """Write tensors as model.safetensors, or as shards plus an index when larger than max_shard_size."""
    limit = parse_size(max_shard_size)
    shards, current, size = [], {}, 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensors[key]
        size += nbytes
    shards.append(current)
    for old in list(path.glob("model*.safetensors")) + [path / INDEX_NAME]:
        old.unlink(missing_ok=True)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(path / SINGLE_NAME), metadata=meta)
        return [SINGLE_NAME]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(path / name), metadata=meta)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return names


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of a directory: from its index when sharded, else model.safetensors."""
    index = path / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        files = [path / f for f in dict.fromkeys(weight_map.values())]
    elif (path / SINGLE_NAME).exists():
        files = [path / SINGLE_NAME]
    else:
        found = sorted(path.glob("*.safetensors"))
        if not found:
            bins = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
            hint = f" (found {bins}: pickle files are never loaded; convert them to safetensors)" if bins else ""
            raise CheckpointError(f"no safetensors weights in {path}{hint}")
        files = found
    for f in files:
        if not f.exists():
            raise CheckpointError(f"weight file {f} listed in the index is missing")
    return files


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in safetensors_files(path):
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    tensors[k] = fh.get_tensor(k)
        except Exception as e:  # safetensors raises its own error types for truncated / corrupt files
            raise CheckpointError(f"cannot read {f}: {e}") from None
    return tensors


# ----------------------------------------------------------------------------- save / load model
def save_pretrained(model, path: str | Path, max_shard_size: int | str = "5GB") -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    cfg.torch_dtype = str(model.dtype).removeprefix("torch.")
    cfg.save(path / "config.json")
    write_safetensors(to_checkpoint(model.state_dict()), path, max_shard_size)


def load_state_strict(model, tensors: dict[str, torch.Tensor], where: str = "checkpoint", dtype=None, device=None):
    """Assign checkpoint tensors to a (possibly meta-device) model; every key must match exactly."""
    state = from_checkpoint(tensors)
    expected = model.state_dict()
    if model.config.llm_config.tie_word_embeddings:
        head = state.pop("language_model.lm_head.weight", None)
        emb = state.get("language_model.model.embed_tokens.weight")
        if head is not None and emb is not None and not torch.equal(head, emb):
            raise CheckpointError(f"{where}: tie_word_embeddings is true but lm_head differs from embed_tokens")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_unsplit(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_unsplit(unexpected)}")
        raise CheckpointError(f"{where} does not match the model config; " + "; ".join(parts))
    for key, t in state.items():
        if t.shape != expected[key].shape:
            raise CheckpointError(f"{where}: {key} has shape {tuple(t.shape)}, the config expects {tuple(expected[key].shape)}")
        state[key] = t.to(dtype=dtype or t.dtype, device=device)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _unsplit(keys: list[str]) -> list[str]:
    """Name stacked expert keys the way the checkpoint spells them."""
    return [k.replace("experts.gate_up_proj", "experts.{e}.gate_proj/up_proj.weight").replace(
        "experts.down_proj", "experts.{e}.down_proj.weight") for k in keys][:50]


def load_pretrained(path: str | Path, dtype=None, device=None):
    from ..model.vlm import SailVL

    path = Path(path)
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path} has no config.json (not a SAIL-VL2 model directory)")
    cfg = SailVLConfig.load(path / "config.json")
    dtype = parse_dtype(dtype) or parse_dtype(cfg.torch_dtype) or torch.float32
    with torch.device("meta"):
        model = SailVL(cfg)
    load_state_strict(model, read_safetensors(path), where=str(path), dtype=dtype, device=device)
    model.config.torch_dtype = str(dtype).removeprefix("torch.")
    return model.eval()
