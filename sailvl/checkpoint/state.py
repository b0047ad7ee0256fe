"""Training-state checkpoints: written atomically, read without pickle.

A checkpoint is a directory `step_{N:08d}` holding
  - `model.safetensors`: the model's state dict (our internal names);
  - `state.safetensors` + `state.json`: everything else (optimiser, scheduler position, AdaLRS, data-loader
    and packer positions, RNG states, counters) as one nested structure whose tensors live in the
    safetensors file and whose other values live in the JSON skeleton;
  - `complete.json`, written last.
The directory is built under a temporary name and renamed into place, so a run killed mid-write leaves
only a `.tmp-*` directory that is never picked; `latest_checkpoint` returns the newest complete one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_STEP_DIR = re.compile(r"^step_(\d{8})$")
_TENSOR = "__tensor__"


def flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "") -> Any:
    """Replace tensors in a nested dict / list structure by references into `tensors`."""
    if isinstance(obj, torch.Tensor):
        key = prefix or "root"
        tensors[key] = obj.detach().cpu().contiguous()
        return {_TENSOR: key}
    if isinstance(obj, dict):
        return {"__dict__": [[flatten(k, tensors, f"{prefix}k{i}"), flatten(v, tensors, f"{prefix}.{i}")]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        out = [flatten(v, tensors, f"{prefix}[{i}]") for i, v in enumerate(obj)]
        return {"__tuple__": out} if isinstance(obj, tuple) else out
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {prefix or 'root'}")


def unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if "__dict__" in obj:
            return {unflatten(k, tensors): unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(unflatten(v, tensors) for v in obj["__tuple__"])
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    return obj


def save_checkpoint(ckpt_root: str | Path, step: int, model_state: dict[str, torch.Tensor], state: dict,
                    keep: int | None = None) -> Path:
    """Atomically write checkpoint `step` under ckpt_root; keep only the newest `keep` complete ones."""
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step_{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten(state, tensors)
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(skeleton))
    return publish(tmp, step, keep)


def publish(tmp: Path, step: int, keep: int | None = None, **info) -> Path:
    """Mark a fully written temporary checkpoint directory complete, rename it into place as `step_N`
    (replacing a same-step one from before a resume) and keep only the newest `keep` complete ones."""
    root, final = tmp.parent, tmp.parent / f"step_{step:08d}"
    (tmp / "complete.json").write_text(json.dumps({"step": step, **info}))
    fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(root)
    if keep:
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def complete_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "complete.json").exists()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(root: str | Path) -> Path | None:
    ckpts = complete_checkpoints(root)
    return ckpts[-1] if ckpts else None


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    if not (path / "complete.json").exists():
        raise ValueError(f"{path} is not a complete checkpoint")
    model_state = load_file(str(path / "model.safetensors"))
    tensors = load_file(str(path / "state.safetensors"))
    state = unflatten(json.loads((path / "state.json").read_text()), tensors)
    return model_state, state
