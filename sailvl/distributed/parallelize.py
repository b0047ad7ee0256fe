"""FSDP2 for SailVL, torchtitan style: activation checkpointing -> `fully_shard` per block -> the root.

    model = parallelize(model, precision="bf16", activation_checkpointing=True)   # after setting requires_grad

Sharding units: every SAIL-ViT block (`vision_model.trunk.blocks[i]`), every LLM decoder layer
(`language_model.model.layers[i]`), then the root, which takes the rest (patch embedding and positions, the
ViT's final norm, the adapter `mlp1`, token embeddings, final norm and the (tied) LM head). Parameters are
sharded on dim 0 over a 1-D mesh of all ranks.

Precision: "bf16" gathers parameters in bf16 and reduces gradients in fp32 (`MixedPrecisionPolicy(
param_dtype=bf16, reduce_dtype=fp32)`); the sharded master weights and the optimiser state stay fp32, and the
trainer runs without autocast. "fp32" computes and reduces in fp32.

Gradients are SUMMED over ranks (FSDP's default is the mean): the trainer normalises each rank's loss by the
loss weight of the whole global step (all micro-batches of all ranks), so the sum of the ranks' gradients
is the gradient of the global loss, exactly as one process with the same global batch computes it.

Frozen parameters (requires_grad False) may share a unit with trainable ones: FSDP2 reduce-scatters only
the gradients that exist, and only the trainable parameters' dtypes must agree. Since which parameters
train is fixed when a unit is built, wrap AFTER the stage has set requires_grad; a later stage with another
trainable set starts from a freshly built, unsharded model (the trainer reloads the stage export).

Every rank must issue the same collectives in the same order, but a rank whose micro-batch has no image
would skip the ViT blocks' all-gathers, and its backward would skip the units that only the image
features need gradients through (e.g. the frozen LLM layers while only the adapter trains): the other
ranks would hang. So in training mode a rank without images runs the ViT + adapter on one blank image
where the images would run, and ties the result to the LLM's input embeddings with a zero gradient:
every output is unchanged (bit-identical), the ViT and adapter get zero gradient from it, and the graph
has the same FSDP units in the same order as on a rank with images.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from . import world_size


def parallelize(model: nn.Module, precision: str = "fp32", activation_checkpointing: bool = False,
                mesh: DeviceMesh | None = None) -> nn.Module:
    """Shard a SailVL in place with FSDP2 (see the module doc); returns the same module."""
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be bf16 or fp32, got {precision!r}")
    if isinstance(model, FSDPModule):
        raise TypeError("the model is already sharded; build a fresh one to wrap it again")
    if mesh is None:
        mesh = init_device_mesh(model.device.type, (world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" \
        else MixedPrecisionPolicy()
    # 1. activation checkpointing: the model checkpoints each ViT block / decoder layer itself (the same
    #    per-block unit torchtitan wraps); FSDP's hooks inside a checkpointed block are re-run on recompute.
    model.vision_model.grad_ckpt = model.language_model.grad_ckpt = activation_checkpointing
    # 2. one FSDP unit per block, 3. the root
    for block in model.vision_model.trunk.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    for layer in model.language_model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    for m in model.modules():
        if isinstance(m, FSDPModule):  # sum, not average, the ranks' gradients (see the module doc)
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    _run_vision_on_every_rank(model)
    return model


class _ZeroGradTie(torch.autograd.Function):
    """Returns (a copy of) x unchanged; in backward, `other` gets a zero gradient (so its graph runs its
    backward, with the same collectives as on a rank whose x depends on real image features)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        ctx.other_shape, ctx.other_dtype = other.shape, other.dtype
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, grad.new_zeros(ctx.other_shape, dtype=ctx.other_dtype) if ctx.needs_input_grad[1] else None


def _run_vision_on_every_rank(model: nn.Module) -> None:
    """Hooks: a training forward without images runs the vision tower on a blank image where the images
    would run (right after the root's pre-forward) and ties the result, with a zero gradient, to the LLM's
    input embeddings, where real image features enter. So every rank's autograd graph has the same FSDP
    units in the same order, in forward and in backward, whatever its data."""
    pending: list[torch.Tensor] = []
    cfg = model.config

    def blank_image():
        size = cfg.force_image_size or cfg.vision_config.image_size
        pixels = torch.zeros(1, 3, size, size, device=model.device)
        return [pixels[0]] if cfg.vision_config.position_embedding == "rope2d" else pixels

    def root_pre_forward(module, args, kwargs):  # after FSDP's own pre-forward (root parameters gathered)
        pending.clear()
        pixel_values = args[1] if len(args) > 1 else kwargs.get("pixel_values")
        if module.training and torch.is_grad_enabled() and pixel_values is None and len(args) < 9 \
                and kwargs.get("image_embeds") is None:
            pending.append(module.encode_images(blank_image()))

    def llm_pre_forward(module, args, kwargs):  # the LLM's input embeddings (outside any checkpointed block)
        if pending and kwargs.get("inputs_embeds") is not None:
            return args, {**kwargs, "inputs_embeds": _ZeroGradTie.apply(kwargs["inputs_embeds"], pending.pop())}
        return None

    def root_post_forward(module, args, output):
        if pending:  # would leave this rank's backward out of step with the others: fail now instead of hanging
            pending.clear()
            raise RuntimeError("the blank-image features did not reach the LLM (called without inputs_embeds?)")

    model.register_forward_pre_hook(root_pre_forward, with_kwargs=True)
    model.language_model.register_forward_pre_hook(llm_pre_forward, with_kwargs=True)
    model.register_forward_hook(root_post_forward)
