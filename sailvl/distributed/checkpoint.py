"""Training-state checkpoints for one process or many (FSDP2), loadable with a different number of ranks.

One process writes the format of `sailvl.checkpoint.state` (model.safetensors + state.safetensors /
state.json), unchanged. Several ranks write a sharded checkpoint, built in `.tmp-step_N-sharded` and
renamed to `step_N` after every rank has finished and `complete.json` is written (so `latest_checkpoint`
never picks a partial one):

    step_N/dcp/shard-0000k-model-00001-of-00001.safetensors   rank k-1's shards of the model ("model.<name>")
                                                              and optimiser state ("optim.<name>.<key>")
    step_N/sharded.json          {"world_size", "param_groups"}: the optimiser's hyperparameters (lr, betas, ...)
    step_N/rank{r}.json / .safetensors   rank r's own state: packer + loader position, AdaLRS, RNG, counters
    step_N/complete.json

The tensors go through torch.distributed.checkpoint (DCP) with its Hugging Face storage layer: plain
safetensors files, each carrying the offsets of its shards as JSON in the safetensors header (DCP's default
`FileSystemWriter` instead writes a `.metadata` file that `FileSystemReader` reads with `pickle.load`, and
pickles any non-tensor value; neither is used here, and only tensors are handed to DCP). Nothing in a
checkpoint is read with pickle.

Loading (`load_train_state`) works for either format with any number of ranks: DCP reshards the model and
optimiser tensors to the current layout (exact values), and a one-process checkpoint is sharded on load.
The data position cannot continue exactly when the number of ranks changed (each rank reads its own shard
of every source): then the new ranks go on with each source's current epoch from the first record that
some old rank had not read yet (nothing of the epoch is skipped; what the faster old ranks had read beyond
that point is read again), the records buffered in the old ranks' packers are dealt out to the new ranks,
and a warning says so (`reshard_packer_state`). A live AdaLRS trial cannot be rolled back on a new layout
(its snapshot holds per-rank shards): it is abandoned, keeping the weights and returning to the pre-trial
lr (a fresh baseline follows), also with a warning. With the same number of ranks, a resume is exact
(model, optimiser, data position, AdaLRS snapshot shards, RNG).

All ranks write into the same directory: several machines need a shared file system.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..checkpoint.state import (flatten, load_checkpoint, publish, save_checkpoint,
                                unflatten)
from . import barrier, is_dist, is_main, rank, world_size

SHARDED = "sharded.json"
_DTENSOR = "__dtensor__"


# ------------------------------------------------------------------------------------------------- save
def save_train_state(ckpt_root: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     state: dict, keep: int | None = None) -> Path:
    """Write checkpoint `step` (every rank calls this). `state`: this rank's other state (nested dicts /
    lists of tensors, numbers, strings)."""
    if not is_dist():
        return save_checkpoint(ckpt_root, step, model.state_dict(), {**state, "optimizer": optimizer.state_dict()},
                               keep=keep)
    root = Path(ckpt_root)
    final, tmp = root / f"step_{step:08d}", root / f".tmp-step_{step:08d}-sharded"
    if is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    msd, osd = get_state_dict(model, optimizer)
    hyper: dict[str, torch.Tensor] = {}
    groups = flatten(osd["param_groups"], hyper)  # lr, betas, ...: the same on every rank
    if hyper:
        raise TypeError(f"tensor-valued optimiser hyperparameters are not supported: {sorted(hyper)}")
    dcp.save(_dcp_tensors(msd, osd), storage_writer=HuggingFaceStorageWriter(str(tmp / "dcp"), save_distributed=True))
    _write_nested(tmp / f"rank{rank()}", _to_local(state))
    if is_main():
        (tmp / SHARDED).write_text(json.dumps({"world_size": world_size(), "param_groups": groups}))
    barrier()
    if is_main():
        publish(tmp, step, keep, world_size=world_size())
    barrier()
    return final


def _dcp_tensors(msd: dict, osd: dict) -> dict[str, torch.Tensor]:
    """One flat {name: tensor} dict (DTensors under FSDP) for DCP; the same names on save and load."""
    out = {f"model.{k}": v for k, v in msd.items()}
    for name, per_param in osd["state"].items():
        for k, v in per_param.items():
            out[f"optim.{name}.{k}"] = v
    for k, v in out.items():
        if not isinstance(v, torch.Tensor):  # DCP would pickle it
            raise TypeError(f"{k}: only tensors go into a sharded checkpoint, got {type(v).__name__}")
    return out


def _write_nested(stem: Path, obj: Any) -> None:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten(obj, tensors)
    save_file(tensors, str(stem) + ".safetensors")
    Path(str(stem) + ".json").write_text(json.dumps(skeleton))


def _read_nested(stem: Path) -> Any:
    return unflatten(json.loads(Path(str(stem) + ".json").read_text()), load_file(str(stem) + ".safetensors"))


# ------------------------------------------------------------------------------------------------- load
def load_train_state(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     packer=None) -> dict:
    """Load the model and optimiser of checkpoint `path` in place (every rank calls this) and return this
    rank's other state (as passed to `save_train_state`). `packer`: this rank's fresh StreamPacker, needed
    to map the data position onto a different number of ranks."""
    path = Path(path)
    if not (path / "complete.json").exists():
        raise ValueError(f"{path} is not a complete checkpoint")
    if (path / SHARDED).exists():
        meta = json.loads((path / SHARDED).read_text())
        msd, osd = get_state_dict(model, optimizer)  # the layout to load into (initialises the optimiser state)
        with warnings.catch_warnings():  # one process reading a sharded checkpoint is intended
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(_dcp_tensors(msd, osd), storage_reader=HuggingFaceStorageReader(str(path / "dcp")),
                     no_dist=not is_dist())
        osd["param_groups"] = unflatten(meta["param_groups"], {})
        set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd)
        saved_world = int(meta["world_size"])
        if saved_world == world_size():
            return _from_local(_read_nested(path / f"rank{rank()}"), model)
        states = [_read_nested(path / f"rank{r}") for r in range(saved_world)]
    else:
        model_state, state = load_checkpoint(path)
        opt_state = state.pop("optimizer")
        if not is_dist():  # the one-process path, exactly as it always was
            device = next(model.parameters()).device
            model.load_state_dict({k: v.to(device) for k, v in model_state.items()})
            optimizer.load_state_dict(opt_state)
            return state
        set_state_dict(model, optimizer, model_state_dict=model_state,
                       optim_state_dict=_optim_by_name(opt_state, model, optimizer),
                       options=StateDictOptions(full_state_dict=True))
        for group, saved in zip(optimizer.param_groups, opt_state["param_groups"]):  # (the full-state path
            group.update({k: v for k, v in saved.items() if k != "params"})       # turns tuples into lists)
        states = [state]
    return _reshard_state(states, packer, path)


def _optim_by_name(opt_state: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """A torch optimiser state dict (parameters by index) -> parameters by name, the form DCP's
    set_state_dict takes. The index order is that of the (identically built) optimiser's param groups."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    return {"state": {order[int(i)]: s for i, s in opt_state["state"].items()},
            "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]} for g in opt_state["param_groups"]]}


def _reshard_state(states: list[dict], packer, path: Path) -> dict:
    """This rank's state from the states of a checkpoint written by len(states) != world_size() ranks."""
    old, new, r = len(states), world_size(), rank()
    global_stream = all(s.get("packer", {}).get("loader", {}).get("world_size") == 1 for s in states)
    if is_main():
        data = ("the data stream (visual packing: one global stream) continues exactly, but per-rank row "
                "batches differ" if global_stream else
                "the data position continues approximately (each source's current epoch goes on from the first "
                "record an old rank had not read, so a few records are read twice)")
        warnings.warn(f"{path} was written by {old} rank(s) and is resumed on {new}: model and optimiser load "
                      f"exactly; {data}, and the loss curve will differ from an uninterrupted run",
                      RuntimeWarning, stacklevel=3)
    state = dict(states[0])  # step, bad_steps, tokens_seen are the same on every rank
    state["rng"] = states[r % old]["rng"]
    if packer is not None:
        state["packer"] = reshard_packer_state([s["packer"] for s in states], packer.state_dict())
    ada = state.get("adalrs")
    if ada is not None and ada.get("phase") == "trial":
        if is_main():
            warnings.warn("an AdaLRS trial was live at this checkpoint; its rollback snapshot does not fit the new "
                          "layout, so the trial is abandoned (weights kept, pre-trial lr, new baseline)",
                          RuntimeWarning, stacklevel=3)
        state["adalrs"] = {**ada, "phase": "baseline", "lr_scale": ada["pre_trial_scale"], "snapshot": None,
                           "pre_trial_scale": None, "losses": [], "base": None}
    return state


# ------------------------------------------------------------------------------ data position, new layout
def reshard_packer_state(old: list[dict], fresh: dict) -> dict:
    """A StreamPacker state for a new rank layout from the packer states of all old ranks.

    `fresh` is the new rank's packer.state_dict() before any batch (it gives the new layout: rank,
    world_size, the loader's mixture RNG). Within a source's current epoch the ranks read one permutation,
    old rank k of K every K-th record from k; the new ranks continue that permutation from the first record
    some old rank had not read yet. So no record of the epoch is skipped, and the records the faster old
    ranks had read beyond that point are read again (at most the spread of the old ranks' positions times
    K). The old packers' buffered records are dealt out round-robin. Per-rank counters restart (rank 0 takes
    the loaders' totals); the trainer's loaders have one worker per rank."""
    new = copy.deepcopy(fresh)
    for key in ("max_len", "rows_per_step", "buffer_size", "max_wait_rows", "loss_weighting", "pad_id"):
        if any(o.get(key) != fresh[key] for o in old):
            raise ValueError(f"packer setting {key} changed: {[o.get(key) for o in old]} -> {fresh[key]}")
    global_stream = [o["loader"]["world_size"] == 1 and o["loader"]["rank"] == 0 for o in old]
    if all(global_stream) and fresh["loader"]["world_size"] == 1:
        # visual packing (every old rank packed the same global stream) or one old rank, and the new ranks read
        # the global stream too: the stream position is layout-free, continue it exactly
        if any(o["loader"] != old[0]["loader"] or o["buffer"] != old[0]["buffer"] for o in old):
            raise ValueError("the old ranks' global-stream packer states differ; cannot continue them")
        return {**copy.deepcopy(old[0]), "counters": old[0]["counters"]}
    if any(global_stream) and len(old) > 1:
        raise ValueError("cannot move between visual packing (one global stream) and per-rank data shards; "
                         "resume with the run's visual_packing setting")
    loader = new["loader"]
    r, w = loader["rank"], loader["world_size"]  # the trainer's loaders have one worker each
    for i, cur in enumerate(loader["sources"]):
        olds = [o["loader"]["sources"][i] for o in old]
        if any((c["name"], c["len"]) != (cur["name"], cur["len"]) for c in olds):
            raise ValueError(f"source {i} changed: {[(c['name'], c['len']) for c in olds]} -> {cur['name']}")
        statuses = {c["status"] for c in olds}
        cur["status"] = next(s for s in ("active", "finished", "unusable") if s in statuses)
        n, old_w = cur["len"], len(old)
        epoch = min(c["epoch"] for c in olds if c["status"] == cur["status"])
        # old rank k has read permutation indices k, k + old_w, ... below pos * old_w + k: every index below
        # the smallest such bound has been read; the new ranks continue from there
        start = min(c["pos"] * old_w + k for k, c in enumerate(olds) if c["epoch"] == epoch)
        cur["epoch"] = epoch
        cur["pos"] = cur["used_in_epoch"] = min(max(0, -(-(start - r) // w)), _shard_len(n, r, w))
        if r == 0:
            for k in ("read", "used", "skipped"):
                cur[k] = sum(c[k] for c in olds)
            for c in olds:
                for kind, count in c["skipped_by_reason"].items():
                    cur["skipped_by_reason"][kind] = cur["skipped_by_reason"].get(kind, 0) + count
    buffered = [b["ref"] for o in old for b in o["buffer"]]
    new["buffer"] = [{"ref": ref, "born": 0} for j, ref in enumerate(buffered) if j % w == r]
    return new


def _shard_len(n: int, shard: int, shards: int) -> int:
    return len(range(shard, n, shards))


# ------------------------------------------------------------------------------------ DTensors per rank
def _to_local(obj: Any) -> Any:
    """DTensors (e.g. in an AdaLRS snapshot of a sharded model) -> this rank's shard plus its global spec."""
    if isinstance(obj, DTensor):
        places = [f"S{p.dim}" if isinstance(p, Shard) else "R" for p in obj.placements]
        if any(not isinstance(p, (Shard, Replicate)) for p in obj.placements):
            raise TypeError(f"cannot checkpoint a DTensor with placements {obj.placements}")
        return {_DTENSOR: obj.to_local(), "shape": list(obj.shape), "stride": list(obj.stride()), "placements": places}
    if isinstance(obj, dict):
        return {k: _to_local(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_local(v) for v in obj)
    return obj


def _from_local(obj: Any, model: torch.nn.Module) -> Any:
    if isinstance(obj, dict):
        if _DTENSOR in obj:
            mesh = next(p.device_mesh for p in model.parameters() if isinstance(p, DTensor))
            places = [Shard(int(p[1:])) if p.startswith("S") else Replicate() for p in obj["placements"]]
            return DTensor.from_local(obj[_DTENSOR], mesh, places, run_check=False, shape=torch.Size(obj["shape"]),
                                      stride=tuple(obj["stride"]))
        return {k: _from_local(v, model) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_from_local(v, model) for v in obj)
    return obj


# ---------------------------------------------------------------------------------------------- export
def gather_model(model: torch.nn.Module):
    """The full weights of an FSDP-sharded SailVL as an unsharded CPU SailVL on rank 0 (None on the other
    ranks; every rank must call this). Without a process group the model itself is returned; a model every
    rank holds whole ("ddp") is returned on rank 0."""
    if not is_dist():
        return model
    from torch.distributed.fsdp import FSDPModule

    from ..model.vlm import SailVL

    if not isinstance(model, FSDPModule):  # "ddp": every rank holds the whole model already
        return model if is_main() else None

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main():
        return None
    with torch.device("meta"):
        out = SailVL(model.config)
    out.load_state_dict(full, strict=True, assign=True)
    return out
