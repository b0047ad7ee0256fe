"""Model soup: a weighted average of homologous SAIL-VL2 checkpoints (shared/SAILVL2.md section 5).

SAIL-VL2 averages checkpoints of the same lineage (same initialisation, similar data, e.g. the SFT phases)
with equal weights; averaging heterologous checkpoints collapses the model. `soup` therefore refuses inputs
that are not structurally identical:

* configs: every directory's config.json, normalised through `SailVLConfig` (so equivalent spellings such as
  `num_local_experts` / `num_experts` compare equal), must match the first one on every field except the
  harmless ones in `IGNORED_CONFIG_KEYS` (`torch_dtype`, ...); the error names the differing dotted keys,
  both values and both directories;
* weights: the safetensors key sets and every tensor's shape must match (names of missing / extra / mismatched
  keys in the error). Non-floating tensors must be equal in all inputs.

Averaging: ``out[k] = sum_i w_i * t_i[k]`` with ``w`` normalised to sum to 1, accumulated in float32
(float64 when an input tensor is float64), cast to the dtype of the first directory's tensor. Tensors are
streamed key by key through `safe_open`, so peak memory is about one output model plus one tensor per input.
The output is a complete model directory: the first directory's config.json (verbatim), the averaged weights
(`write_safetensors`, sharded above `max_shard_size`), the first directory's tokenizer / processor files
(`COPIED_FILES`), and `soup.json` recording the sources and normalised weights.

A single directory is allowed: the "soup" of one checkpoint is a re-written copy of it (bit-exact values),
which keeps scripted top-k soups working when k = 1.
"""

from __future__ import annotations

import json
import math
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..checkpoint.hf import CheckpointError, safetensors_files, write_safetensors
from ..config import SailVLConfig
from ..data.tokenizer import TOKENIZER_FILES

__all__ = ["COPIED_FILES", "IGNORED_CONFIG_KEYS", "soup"]

# Config fields that may differ between soup ingredients (compared on the last component of a dotted key).
IGNORED_CONFIG_KEYS = frozenset({"torch_dtype", "dtype", "transformers_version", "_name_or_path", "_commit_hash"})
# Non-weight files of a model directory copied from the first ingredient.
COPIED_FILES = (*TOKENIZER_FILES, "preprocessor_config.json")

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None),
}


def soup(model_dirs: list[str | Path], out_dir: str | Path, weights: list[float] | None = None, *,
         max_shard_size: int | str = "5GB", overwrite: bool = False) -> Path:
    """Average homologous SAIL-VL2 model directories into `out_dir`; returns `out_dir` as a Path.

    weights: one non-negative finite number per directory (normalised to sum 1); None = equal weights.
    overwrite: allow writing into a non-empty `out_dir` (stale weight shards there are removed).
    Raises ValueError (CheckpointError for unreadable / mismatched weight files) before writing anything.
    """
    dirs = [Path(d) for d in model_dirs]
    if not dirs:
        raise ValueError("soup needs at least one model directory")
    out = Path(out_dir)
    w = _normalise_weights(weights, len(dirs))
    for d in dirs:
        if not (d / "config.json").is_file():
            raise ValueError(f"{d} has no config.json (not a SAIL-VL2 model directory)")
        if out.resolve() == d.resolve():
            raise ValueError(f"the output directory {out} is one of the inputs; write the soup elsewhere")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise ValueError(f"{out} exists and is not an empty directory (pass overwrite=True to replace its model)")

    _check_configs(dirs)

    with ExitStack() as stack:
        index = [_open_weights(d, stack) for d in dirs]  # per dir: key -> open safe_open handle
        meta = _check_tensors(dirs, index)
        averaged = {}
        for key in sorted(index[0]):
            averaged[key] = _average(key, [ix[key] for ix in index], w, meta[key], dirs)

    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(averaged, out, max_shard_size)
    shutil.copyfile(dirs[0] / "config.json", out / "config.json")
    for name in COPIED_FILES:
        if (dirs[0] / name).is_file():
            shutil.copyfile(dirs[0] / name, out / name)
    (out / "soup.json").write_text(json.dumps(
        {"sources": [str(d) for d in dirs], "weights": w}, indent=2) + "\n")
    return out


# ---------------------------------------------------------------------------------------- weights
def _normalise_weights(weights: list[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    weights = list(weights)
    if len(weights) != n:
        raise ValueError(f"soup got {len(weights)} weights for {n} model directories")
    try:
        values = [float(x) for x in weights]
    except (TypeError, ValueError):
        raise ValueError(f"soup weights must be numbers, got {weights}") from None
    bad = [x for x in values if not math.isfinite(x)]
    if bad:
        raise ValueError(f"soup weights must be finite, got {weights}")
    if any(x < 0 for x in values):
        raise ValueError(f"soup weights must be >= 0, got {weights}")
    total = math.fsum(values)
    if not total > 0:
        raise ValueError(f"soup weights must have a positive sum, got {weights}")
    return [x / total for x in values]


# ---------------------------------------------------------------------------------------- configs
def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _comparable_config(d: Path) -> dict[str, Any]:
    try:
        cfg = SailVLConfig.load(d / "config.json")
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{d}/config.json is not a valid SAIL-VL2 config: {e}") from None
    flat = _flatten(cfg.to_dict())
    return {k: v for k, v in flat.items() if k.rsplit(".", 1)[-1] not in IGNORED_CONFIG_KEYS}


def _check_configs(dirs: list[Path]) -> None:
    ref = _comparable_config(dirs[0])
    for d in dirs[1:]:
        other = _comparable_config(d)
        keys = sorted(k for k in ref.keys() | other.keys() if ref.get(k, "<absent>") != other.get(k, "<absent>"))
        if keys:
            shown = ", ".join(f"{k} ({ref.get(k, '<absent>')!r} vs {other.get(k, '<absent>')!r})" for k in keys[:20])
            more = f" and {len(keys) - 20} more" if len(keys) > 20 else ""
            raise ValueError(
                f"cannot soup heterologous checkpoints: configs of {dirs[0]} and {d} differ in {shown}{more}")


# ---------------------------------------------------------------------------------------- tensors
def _open_weights(d: Path, stack: ExitStack) -> dict[str, Any]:
    keys: dict[str, Any] = {}
    for f in safetensors_files(d):
        try:
            fh = stack.enter_context(safe_open(str(f), framework="pt"))
            names = list(fh.keys())
        except Exception as e:  # noqa: BLE001 - safetensors' own error types for truncated / corrupt files
            raise CheckpointError(f"cannot read {f}: {e}") from None
        for k in names:
            if k in keys:
                raise CheckpointError(f"{d}: tensor {k} appears in more than one weight file")
            keys[k] = fh
    return keys


def _check_tensors(dirs: list[Path], index: list[dict[str, Any]]) -> dict[str, tuple[list[int], list[str]]]:
    """Same key set and shapes everywhere; returns key -> (shape, safetensors dtype name per directory)."""
    ref_keys = set(index[0])
    for d, ix in zip(dirs[1:], index[1:]):
        missing, extra = sorted(ref_keys - set(ix)), sorted(set(ix) - ref_keys)
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing in {d}: {missing[:20]}")
            if extra:
                parts.append(f"only in {d}: {extra[:20]}")
            raise CheckpointError(f"cannot soup {dirs[0]} and {d}: tensor names differ; " + "; ".join(parts))
    meta = {}
    for key in sorted(ref_keys):
        infos = [ix[key].get_slice(key) for ix in index]
        shapes = [list(s.get_shape()) for s in infos]
        for d, shape in zip(dirs[1:], shapes[1:]):
            if shape != shapes[0]:
                raise CheckpointError(
                    f"cannot soup {dirs[0]} and {d}: {key} has shape {tuple(shapes[0])} vs {tuple(shape)}")
        meta[key] = (shapes[0], [s.get_dtype() for s in infos])
    return meta


def _average(key: str, handles: list[Any], w: list[float], meta: tuple[list[int], list[str]], dirs: list[Path]):
    """sum_i w_i * t_i in float32 (float64 if any input is float64), cast to the first input's dtype."""
    dtypes = [_ST_DTYPES.get(name) for name in meta[1]]
    if any(dt is None or not dt.is_floating_point for dt in dtypes):  # integer / bool / unknown: must agree
        first = handles[0].get_tensor(key)
        for d, h in zip(dirs[1:], handles[1:]):
            t = h.get_tensor(key)
            if t.dtype != first.dtype or not torch.equal(first, t):
                raise CheckpointError(f"cannot soup {dirs[0]} and {d}: non-floating tensor {key} differs")
        return first
    acc_dtype = torch.float64 if torch.float64 in dtypes else torch.float32
    acc = None
    for wi, h in zip(w, handles):
        term = h.get_tensor(key).to(acc_dtype) * wi
        acc = term if acc is None else acc.add_(term)
    return acc.to(dtypes[0]).contiguous()
