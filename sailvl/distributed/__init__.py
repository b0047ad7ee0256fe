"""Rank-aware helpers: everything works unchanged in a single process (no process group).

Under `torchrun` (WORLD_SIZE > 1) `init_from_env` creates the default process group (gloo on CPU, nccl on
CUDA, one GPU per local rank). `parallelize` (FSDP2 wrapping) and `checkpoint` (sharded training-state
checkpoints via torch.distributed.checkpoint) live in the submodules of the same names.
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: torch.device) -> bool:
    """Initialise the default process group when launched by torchrun (WORLD_SIZE > 1). gloo on CPU, nccl on
    CUDA (each process then uses the GPU of its LOCAL_RANK)."""
    if is_dist() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_dist()
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    atexit.register(_destroy)
    return True


def _destroy() -> None:
    if is_dist():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks in place (and return it). CPU tensors work under nccl too (via the GPU)."""
    if is_dist():
        if t.device.type == "cpu" and dist.get_backend() == "nccl":
            g = t.cuda()
            dist.all_reduce(g, op=dist.ReduceOp.SUM)
            t.copy_(g.cpu())
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_grads(params: list[torch.Tensor], divide: int = 1) -> None:
    """Data parallelism with the whole model on every rank ("ddp"): sum (then divide by `divide`) the
    gradients of `params` over ranks, in one flat bucket (one collective per step: what small models on CPU
    need). A parameter this rank gave no gradient (e.g. the ViT on a rank whose rows have no image) counts
    as zeros; one that no rank gave a gradient keeps none, as in one process (AdamW then skips it)."""
    if not is_dist() or not params:
        return
    has = [p.grad is not None for p in params]
    flat = torch.cat([*((p.grad if h else torch.zeros_like(p)).reshape(-1).float() for p, h in zip(params, has)),
                      torch.tensor(has, dtype=torch.float32)])
    all_reduce_sum(flat)
    if divide != 1:
        flat[:-len(params)] /= divide
    anyone = flat[-len(params):] > 0
    offset = 0
    for p, some in zip(params, anyone.tolist()):
        g = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
        if not some:
            p.grad = None
        elif p.grad is None:
            p.grad = g.to(p.dtype).clone()
        else:
            p.grad.copy_(g)


def barrier() -> None:
    if is_dist():
        dist.barrier()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective: every rank must call it); plain tensors pass through."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ that also returns a plain tensor for FSDP2 (DTensor) gradients: the
    norm is over the whole (sharded) model and is the same on every rank."""
    return full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm))
