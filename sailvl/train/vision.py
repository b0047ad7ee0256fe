"""SAIL-ViT pretraining on dense synthetic labels (a `Stage` with kind="vision").

The paper's SAIL-ViT starts from AIMv2, a pretrained encoder; a tower trained from scratch only through the
LLM's sparse answer tokens learns to see too slowly for a CPU demo (measured: single-character OCR stays at
chance after 600 VLM steps from a fresh ViT, and reaches 0.33 in 300 steps from a ViT that was first trained
directly on images). This stage gives the ViT that start: linear heads on its patch features predict, for
every patch, the colour / shape / size / character that covers it (`sailvl.data.synth.dense`) and, with the
vision option `position` (a loss weight), the patch's own row and column. Only the ViT
(and the throwaway heads) train; the stage exports the whole model like any other, the heads are saved next
to it (`vision_heads.safetensors`) and its checkpoints resume exactly (the images are a pure function of
the seed and the step).
"""

from __future__ import annotations

import time
import warnings
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from .. import distributed as D
from ..checkpoint.state import latest_checkpoint
from ..data.synth.dense import BIND_HEADS, HEADS, IGNORE, IMAGE_TEXT, TEXT_SLOTS, DenseStream
from ..data.synth.world import World
from ..distributed.checkpoint import load_train_state, save_train_state
from .optim import apply_trainable, build_optimizer, lr_at, set_lr
from .progress import Progress

if TYPE_CHECKING:
    from ..model.vlm import SailVL
    from .stages import Stage
    from .trainer import Trainer


# Position heads (vision option "position": their loss weight; 0 = none): each patch names its row and column
# (labels 1..grid; 0 unused). Without them the dense labels (all of them local: what covers this patch) let the
# tower drop where a patch is: a linear probe on the last layer's features of the demo's tower found a patch's row
# 0.22 (chance 0.125), its index 0.10 (chance 0.016), and every task about places (spatial, grounding, table
# cells, motion) stayed at chance.
POSITION = ("row", "col")


def position_labels(n: int, grid: int) -> dict[str, torch.Tensor]:
    """{row, col: [n, grid, grid]} labels 1..grid of every patch of n images (row-major patches)."""
    idx = torch.arange(1, grid + 1)
    return {"row": idx[:, None].expand(grid, grid).expand(n, grid, grid).contiguous(),
            "col": idx[None, :].expand(grid, grid).expand(n, grid, grid).contiguous()}


class DenseHeads(nn.Module):
    """One linear classifier per label head over the ViT's patch features, a small MLP reading the image's
    transcript (TEXT_SLOTS characters) from the mean of all patch features, (grid > 0) the position heads and (bind)
    the binding heads (dense.BIND_HEADS)."""

    def __init__(self, width: int, grid: int = 0, bind: bool = False):
        super().__init__()
        self.heads = nn.ModuleDict({name: nn.Linear(width, len(vocab)) for name, vocab in HEADS.items()})
        self.image_text = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                        nn.Linear(4 * width, TEXT_SLOTS * len(HEADS["char"])))
        self.where = nn.ModuleDict({name: nn.Linear(width, grid + 1) for name in POSITION}) if grid else None
        self.bind = nn.ModuleDict({name: nn.Linear(width, len(v)) for name, v in BIND_HEADS.items()}) if bind else None

    def forward(self, feats_NPD: torch.Tensor) -> dict[str, torch.Tensor]:
        text = self.image_text(feats_NPD.mean(1)).view(len(feats_NPD), TEXT_SLOTS, len(HEADS["char"]))
        out = {**{name: head(feats_NPD) for name, head in self.heads.items()}, IMAGE_TEXT: text}
        for extra in (self.where, self.bind):
            if extra is not None:
                out.update({name: head(feats_NPD) for name, head in extra.items()})
        return out


class EmbedHeads(nn.Module):
    """Per-token classifiers over the adapter's output whose class vectors are the LLM's input embeddings of
    the label words ("red", "circle", "7", ...; a learned vector for "nothing"). Training the ViT and adapter
    against them puts each visual token near the embedding of what it shows, in the space the (tied) LM head
    answers from: SAIL-ViT warm-up's alignment of visual features to the LLM's embedding space."""

    def __init__(self, embed: nn.Embedding, word_ids: dict[str, list[int]]):
        super().__init__()
        object.__setattr__(self, "_embed", embed)  # not a submodule: the LLM owns (and checkpoints) it
        for name, ids in word_ids.items():
            self.register_buffer(f"ids_{name}", torch.tensor(ids), persistent=False)
        self.none = nn.ParameterDict({name: nn.Parameter(torch.zeros(embed.embedding_dim)) for name in word_ids})

    def forward(self, tokens_NTE: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for name, none in self.none.items():
            classes = torch.cat([none[None], self._embed.weight[getattr(self, f"ids_{name}")]])
            out[name] = tokens_NTE @ classes.to(tokens_NTE.dtype).T
        return out


# label -> the word whose embedding stands for it (the shape head's non-object classes)
_WORD = {"char": "text", "bar": "bar"}


def word_ids(tokenizer) -> dict[str, list[int]]:
    """The first token of each label word (index 0, "none", excluded) for EmbedHeads."""
    return {name: [tokenizer.encode(_WORD.get(w, w), add_special_tokens=False).ids[0] for w in vocab[1:]]
            for name, vocab in HEADS.items()}


class _Pair(nn.Module):
    """Model + heads as one module, so checkpoints hold both under stable names."""

    def __init__(self, model: nn.Module, heads: nn.Module):
        super().__init__()
        self.model, self.heads = model, heads


def label_counts(labels: dict[str, torch.Tensor]) -> dict[str, float]:
    """Labelled entries (not IGNORE) per head: what each head's summed cross-entropy is divided by."""
    return {name: float((y != IGNORE).sum()) for name, y in labels.items()}


def dense_loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor],
               counts: dict[str, float] | None = None, weights: dict[str, float] | None = None
               ) -> tuple[torch.Tensor, dict]:
    """Sum over heads of the mean cross-entropy over labelled entries (patches; transcript slots, "end"
    included); also each head's accuracy where something is there (patches something covers, transcript
    characters), the number that says whether the tower sees. `counts`: the denominators (default: this
    batch's label_counts; several ranks, each holding a share of the step's images, pass the step's counts /
    ranks, so the summed gradients are the one-process gradient). `weights`: per-head loss weights (default 1)."""
    counts = label_counts(labels) if counts is None else counts
    loss, acc = 0.0, {}
    for name, lg in logits.items():
        y = labels[name].reshape(-1)
        lg = lg.reshape(-1, lg.shape[-1]).float()
        if counts[name] > 0:
            w = (weights or {}).get(name, 1.0)
            loss = loss + w * F.cross_entropy(lg, y, ignore_index=IGNORE, reduction="sum") / counts[name]
        fg = y > 0
        acc[name] = float((lg[fg].argmax(-1) == y[fg]).float().mean()) if bool(fg.any()) else float("nan")
    return loss, acc


def stream_for(stage: Stage, model: SailVL, seed: int) -> DenseStream:
    opts = dict(stage.vision or {})
    world = World(**{k: tuple(v) if isinstance(v, list) else v for k, v in opts.pop("world", {}).items()})
    v = model.config.vision_config
    if world.image_size != v.image_size:
        raise ValueError(f"stage {stage.name!r}: the dense world's image_size {world.image_size} != the ViT's "
                         f"{v.image_size}")
    target = opts.pop("target", "vit")
    opts.pop("position", None)  # read by train_vision_stage
    opts.pop("bind", None)
    unknown = set(opts) - {"kinds"}
    if unknown:
        raise ValueError(f"stage {stage.name!r}: unknown vision options {sorted(unknown)} (known: world, kinds, "
                         f"target, position, bind)")
    # llm_embed: one label per LLM token, i.e. per pixel-shuffled 2x2 block of patches
    patch = v.patch_size if target == "vit" else int(round(v.patch_size / model.config.downsample_ratio))
    return DenseStream(world, patch, seed, **opts)


def train_vision_stage(trainer: Trainer, si: int, stage: Stage, model: SailVL) -> None:
    run = trainer.run
    if not stage.steps:  # a skipped stage (e.g. stages.vit_dense.steps=0 under torchrun): nothing to train
        return
    target = (stage.vision or {}).get("target", "vit")
    if target not in ("vit", "llm_embed"):
        raise ValueError(f"stage {stage.name!r}: vision target must be 'vit' or 'llm_embed', got {target!r}")
    groups = {"vit": "vision_model.", **({"adapter": "mlp1."} if target == "llm_embed" else {})}
    for name in stage.trainable:
        if name not in groups and not name.startswith(tuple(groups.values())):
            raise ValueError(f"stage {stage.name!r} (kind vision, target {target}) can only train {list(groups)}, "
                             f"not {name!r}")
    n_train, n_total = apply_trainable(model, stage)
    model.vision_model.grad_ckpt = run.activation_checkpointing
    model.train()
    stream = stream_for(stage, model, run.seed * 1000 + si)
    # weight of the position heads' loss (0: no position heads)
    position = float((stage.vision or {}).get("position", 0.0))
    if position < 0 or (position and target != "vit"):
        raise ValueError(f"stage {stage.name!r}: vision option position must be >= 0 and needs target 'vit'")
    # weight of the binding heads' loss (0: none)
    bind = float((stage.vision or {}).get("bind", 0.0))
    if bind < 0 or (bind and target != "vit"):
        raise ValueError(f"stage {stage.name!r}: vision option bind must be >= 0 and needs target 'vit'")
    if target == "vit":
        heads = DenseHeads(model.config.vision_config.hidden_size, stream.grid if position else 0,
                           bind=bool(bind)).to(trainer.device)
    else:
        from ..data.tokenizer import load_tokenizer

        heads = EmbedHeads(model.language_model.model.embed_tokens,
                           word_ids(load_tokenizer(run.tokenizer or run.init))).to(trainer.device)
    optimizer = build_optimizer(model, stage)
    head_lr = stage.lr.get("heads", stage.lr.get("vit", max(stage.lr.values())))
    optimizer.add_param_group({"params": list(heads.parameters()), "base_lr": head_lr, "lr": head_lr,
                               "weight_decay": 0.0})
    pair = _Pair(model, heads)
    step, bad = 0, 0
    ckpt_root = trainer.stage_dir(si) / "checkpoints"
    latest = latest_checkpoint(ckpt_root) if trainer.resume else None
    if latest is not None:
        state = load_train_state(latest, pair, optimizer)
        step, bad = state["step"], state["bad_steps"]
        trainer._truncate_metrics(si, step)
        trainer._say(f"stage {stage.name}: resumed from {latest}")
    trainer._say(f"stage {stage.name}: {n_train / 1e6:.2f}M of {n_total / 1e6:.2f}M parameters train (ViT on "
                 f"dense synthetic labels), {stage.steps} steps of {stage.rows_per_step} images")
    autocast = torch.autocast(trainer.device.type, dtype=torch.bfloat16) if run.precision == "bf16" else nullcontext()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sel = model.config.select_layer
    progress = Progress(stage.steps, stage.name, every=run.log_every, enabled=D.is_main() and not trainer.quiet,
                        start=step)
    n, world, rank = stage.rows_per_step, trainer.world, trainer.rank
    while step < stage.steps:
        t0 = time.perf_counter()
        # several ranks (the whole tower on each, "ddp"): the step's images are drawn as one batch of n x ranks
        # and every rank trains on its slice, so the step is the one a single process with n x ranks takes
        pixels, labels = stream.batch(step, n, offset=rank * n)
        if position:
            labels.update(position_labels(len(pixels), stream.grid))
        pixels, labels = pixels.to(trainer.device), {k: v.to(trainer.device) for k, v in labels.items()}
        counts = None
        if world > 1:
            local = label_counts(labels)
            red = D.all_reduce_sum(torch.tensor(list(local.values()), dtype=torch.float64)) / world
            counts = dict(zip(local, red.tolist()))
        with autocast:
            if target == "vit":
                feats = model.vision_model(pixels, select_layer=sel)
            else:  # the LLM tokens the adapter makes, [N, T, E]
                feats = model.encode_images(pixels).view(len(pixels), -1, model.config.llm_config.hidden_size)
            loss, acc = dense_loss(heads(feats), labels, counts,
                                   weights={**{k: position for k in POSITION}, **{k: bind for k in BIND_HEADS}})
        finite = bool(torch.isfinite(loss))
        if world > 1:  # one decision for all ranks (they must issue the same collectives)
            finite = D.all_reduce_sum(torch.tensor([0.0 if finite else 1.0])).item() == 0
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            bad += 1
            warnings.warn(f"stage {stage.name} step {step}: non-finite loss, step skipped ({bad} in a row)",
                          RuntimeWarning, stacklevel=2)
            if bad >= run.max_bad_steps:
                from .trainer import TrainingError

                raise TrainingError(f"stage {stage.name}: {bad} non-finite steps in a row at step {step}")
            step += 1
            continue
        bad = 0
        loss.backward()
        D.all_reduce_grads(params, divide=world)  # (one process: nothing to do)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, run.grad_clip)
        set_lr(optimizer, lr_at(stage, step))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        dt = time.perf_counter() - t0
        if world > 1:  # the step's loss and (approximately: mean over ranks) accuracies
            red = D.all_reduce_sum(torch.tensor([loss.item(), *acc.values()], dtype=torch.float64)) / world
            loss_value, acc = float(red[0]), dict(zip(acc, red[1:].tolist()))
        else:
            loss_value = loss.item()
        rec = {"stage": stage.name, "stage_index": si, "step": step, "loss": loss_value,
               "lr": optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm),
               "images": n * world, "images_per_s": n * world / dt,
               **{f"acc_{k}": v for k, v in acc.items()}}
        trainer._log(rec)
        progress.update(step, loss=rec["loss"], lr=rec["lr"], acc_char=round(acc["char"], 3),
                        acc_shape=round(acc["shape"], 3), acc_text=round(acc.get(IMAGE_TEXT, float("nan")), 3),
                        img_s=int(rec["images_per_s"]))
        if step % run.checkpoint_every == 0 or step == stage.steps:
            save_train_state(ckpt_root, step, pair, optimizer, {"step": step, "bad_steps": bad},
                             keep=run.keep_checkpoints)
    if D.is_main():
        save_file({k: v.detach().float().contiguous().cpu() for k, v in heads.state_dict().items()},
                  str(trainer.stage_dir(si) / "vision_heads.safetensors"))
