"""One trainer for every stage of a run.

Features:
  - stages as data (`RunConfig` / `Stage`): trainable modules, lr per module group, warmup + cosine / WSD,
    data mixtures through the resumable MixtureLoader and the StreamPacker (packed rows, per-sample
    positions, block-diagonal attention), token / sample / sqrt loss weighting normalised over the whole
    step (all micro-batches, all ranks), MoE aux-loss and z-loss, expert-load entropy per layer;
  - bf16 autocast (CPU and GPU), gradient clipping, optional activation checkpointing, AdaLRS;
  - a non-finite loss or gradient skips the step with a warning; `max_bad_steps` in a row stop the run;
  - atomic checkpoints (model, optimiser, schedule position, AdaLRS, loader + packer position, RNG, counters)
    every `checkpoint_every` steps; `resume=True` continues from the newest complete one and reproduces the
    uninterrupted loss curve exactly on CPU;
  - each stage ends with a SAIL-VL2-layout model directory `NN_stage/model` (weights, tokenizer, processor);
  - `metrics.jsonl` (one line per step) and a progress line with loss, lr, tokens/s and ETA;
  - under torchrun (several ranks): FSDP2 per ViT block / decoder layer (`sailvl.distributed.parallelize`,
    bf16 as a mixed-precision policy instead of autocast), gradients summed over ranks so the same global
    batch gives the same loss and update as one process, sharded checkpoints loadable on any number of ranks
    (`sailvl.distributed.checkpoint`), the stage export gathered to rank 0, metrics summed over ranks.
    `parallel="ddp"` instead keeps the whole model on every rank (bf16 autocast) and all-reduces the gradients
    once per step: for small models, where FSDP's per-block collectives cost more than the compute they share
    (measured on 2 CPU cores with the tiny recipe; benchmarks/bench_parallel.py).
"""

from __future__ import annotations

import json
import random
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch

from .. import distributed as D
from ..checkpoint.state import latest_checkpoint
from ..data.loader import MixtureLoader
from ..data.packing import PackedBatch, StreamPacker
from ..data.processor import Processor, ProcessorConfig
from ..data.sources import open_sources
from ..data.tokenizer import load_tokenizer
from ..distributed.checkpoint import gather_model, load_train_state, save_train_state
from ..distributed.parallelize import parallelize
from ..model.vlm import SailVL
from .budget import Budget
from .focus import focus_loss, set_capture
from .optim import apply_trainable, build_optimizer, lr_at, set_lr
from .progress import Progress
from .stages import RunConfig, Stage
from .vision import train_vision_stage

DONE = "DONE"


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. too many non-finite losses in a row)."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Trainer:
    def __init__(self, run: RunConfig, resume: bool = False, quiet: bool = False, budget: Budget | None = None):
        """`budget` (one process only): a `sailvl.train.budget.Budget` that sets each stage's steps as it starts,
        so the run ends within a wall-clock budget."""
        self.run, self.resume, self.quiet, self.budget = run, resume, quiet, budget
        self.dir = Path(run.run_dir)
        self.device = pick_device(run.device)
        D.init_from_env(self.device)
        self.rank, self.world = D.rank(), D.world_size()
        if budget is not None and self.world > 1:
            raise ValueError("a time budget needs a single-process run (every rank must take the same steps)")
        self.metrics_path = self.dir / "metrics.jsonl"

    # ------------------------------------------------------------------------------------------ run
    def fit(self) -> Path:
        """Run every stage; returns the last stage's model directory."""
        self._prepare_dir()
        torch.manual_seed(self.run.seed)
        random.seed(self.run.seed)
        model, processor, tok_dir = self._start()
        final = None
        for si, stage in enumerate(self.run.stages):
            sdir = self.stage_dir(si)
            export = sdir / "model"
            if (export / DONE).exists():
                model = SailVL.from_pretrained(export, dtype=torch.float32, device=self.device)
                final = export
                self._say(f"stage {stage.name}: already done ({export})")
                continue
            if self.budget is not None:
                stage = self.run.stages[si] = self.budget.stage(self.run.stages, si)
                self._say(f"stage {stage.name}: {stage.steps} steps under the time budget "
                          f"(recipe: {self.budget.state['stages'][stage.name]['of']})")
            model = self._stage_model(stage, model)
            t0 = time.perf_counter()
            if stage.kind == "vision":
                train_vision_stage(self, si, stage, model)
            else:
                self._train_stage(si, stage, model, processor)
            self._export(model, processor, tok_dir, export)
            if self.world > 1:  # FSDP units are built per trainable set: the next stage wraps a fresh copy
                model = SailVL.from_pretrained(export, dtype=torch.float32, device=self.device)
            final = export
            self._say(f"stage {stage.name}: {stage.steps} steps in {time.perf_counter() - t0:.1f}s -> {export}")
        return final

    def stage_dir(self, si: int) -> Path:
        return self.dir / f"{si:02d}_{self.run.stages[si].name}"

    def _prepare_dir(self) -> None:
        cfg_file = self.dir / "run.json"
        exists = cfg_file.exists()
        D.barrier()  # every rank looks before rank 0 writes
        if exists and not self.resume:
            raise ValueError(f"{self.dir} already holds a run; pass --resume to continue it or choose another name")
        if D.is_main():
            self.dir.mkdir(parents=True, exist_ok=True)
            cfg_file.write_text(json.dumps(self.run.to_dict(), indent=2) + "\n")
        D.barrier()

    def _start(self) -> tuple[SailVL, Processor, Path]:
        run = self.run
        tok_dir = Path(run.tokenizer or run.init or "")
        if not (tok_dir / "tokenizer.json").exists():
            raise ValueError(f"no tokenizer.json in {tok_dir} (set `tokenizer` in the run config)")
        if run.init is not None:
            if not (Path(run.init) / "config.json").exists():
                raise ValueError(f"the run starts from {run.init}, which is not a model directory")
            model = SailVL.from_pretrained(run.init, dtype=torch.float32, device=self.device)
        else:
            model = SailVL(run.model).to(self.device)
        tokenizer = load_tokenizer(tok_dir)
        processor = Processor(tokenizer, ProcessorConfig.from_model_config(model.config, **run.processor))
        if model.config.img_context_token_id is None:
            model.config.img_context_token_id = processor.img_context_id
        elif model.config.img_context_token_id != processor.img_context_id:
            raise ValueError(f"model img_context_token_id {model.config.img_context_token_id} != tokenizer's "
                             f"<IMG_CONTEXT> id {processor.img_context_id}")
        if tokenizer.get_vocab_size() > model.config.llm_config.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.get_vocab_size()} tokens but the model only "
                             f"{model.config.llm_config.vocab_size} embedding rows")
        return model, processor, tok_dir

    def _stage_model(self, stage: Stage, model: SailVL) -> SailVL:
        if stage.init_from is None:
            return model
        names = [s.name for s in self.run.stages]
        path = self.stage_dir(names.index(stage.init_from)) / "model" if stage.init_from in names \
            else Path(stage.init_from)
        if not (path / "config.json").exists():
            raise ValueError(f"stage {stage.name!r} starts from {path}, which does not exist (yet)")
        return SailVL.from_pretrained(path, dtype=torch.float32, device=self.device)

    # ---------------------------------------------------------------------------------------- stage
    def _data(self, si: int, stage: Stage, processor: Processor) -> StreamPacker:
        cfg = ProcessorConfig(**{**processor.config.__dict__, "max_length": stage.max_len})
        if stage.max_dynamic_patch is not None:
            cfg.max_dynamic_patch = stage.max_dynamic_patch
        proc = Processor(processor.tokenizer, cfg)
        specs = [{"path": d.path, "weight": d.weight, **({"name": d.name} if d.name else {})} for d in stage.data]
        # visual packing: one global stream on every rank, rows dealt out by vision tokens (see data.packing)
        balance = (self.rank, self.world) if self.world > 1 and self.run.visual_packing else None
        rank, world = (0, 1) if balance else (self.rank, self.world)
        loader = MixtureLoader(open_sources(specs), seed=self.run.seed * 1000 + si, rank=rank, world_size=world,
                               process=proc.encode_sample, report_dir=None if balance and not D.is_main() else self.stage_dir(si))
        pad = processor.tokenizer.token_to_id("<|endoftext|>") or 0
        return StreamPacker(loader, stage.max_len, stage.rows_per_step, loss_weighting=stage.loss_weighting, pad_id=pad,
                            balance=balance)

    def _train_stage(self, si: int, stage: Stage, model: SailVL, processor: Processor) -> None:
        run, cfg = self.run, model.config.llm_config
        n_train, n_total = apply_trainable(model, stage)
        model.language_model.grad_ckpt = model.vision_model.grad_ckpt = run.activation_checkpointing
        ddp = self.world > 1 and run.parallel == "ddp"
        if self.world > 1 and not ddp:  # after freezing: FSDP units are built for this stage's trainable parameters
            parallelize(model, run.precision, run.activation_checkpointing)
        focus = stage.focus
        if focus is not None:
            if run.activation_checkpointing:
                raise ValueError(f"stage {stage.name}: attention supervision (focus) needs activation checkpointing off")
            set_capture(model, focus["layers"], True)
        model.train()
        optimizer = build_optimizer(model, stage)
        packer = self._data(si, stage, processor)
        adalrs = None
        if stage.adalrs is not None:
            from .adalrs import AdaLRS, AdaLRSConfig

            adalrs = AdaLRS(AdaLRSConfig(**stage.adalrs), model, optimizer)
        step, bad, tokens_seen = 0, 0, 0
        ckpt_root = self.stage_dir(si) / "checkpoints"
        latest = latest_checkpoint(ckpt_root) if self.resume else None
        if latest is not None:  # model and optimiser load in place, from a checkpoint of any number of ranks
            state = load_train_state(latest, model, optimizer, packer)
            packer.load_state_dict(state["packer"])
            if adalrs is not None:
                adalrs.load_state_dict(state["adalrs"])
            torch.set_rng_state(state["rng"]["torch"])
            random.setstate(state["rng"]["python"])
            step, bad, tokens_seen = state["step"], state["bad_steps"], state["tokens_seen"]
            self._truncate_metrics(si, step)
            self._say(f"stage {stage.name}: resumed from {latest}")
        self._say(f"stage {stage.name}: {n_train / 1e6:.2f}M of {n_total / 1e6:.2f}M parameters train, "
                  f"{stage.steps} steps of {stage.grad_accum} x {stage.rows_per_step} x {stage.max_len} tokens")
        use_autocast = run.precision == "bf16" and (self.world == 1 or ddp)  # FSDP: its mixed-precision policy
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if use_autocast else nullcontext()
        sync = self.world > 1  # every rank runs the same backward passes and norm (FSDP collectives)
        batches = iter(packer)
        progress = Progress(stage.steps, stage.name, every=run.log_every, enabled=D.is_main() and not self.quiet,
                            start=step)
        params = [p for p in model.parameters() if p.requires_grad]
        while step < stage.steps:
            t0 = time.perf_counter()
            micro = [next(batches).to(self.device, torch.float32) for _ in range(stage.grad_accum)]
            total_w = D.all_reduce_sum(torch.stack([b.loss_weights.sum() for b in micro]).sum().to(self.device))
            sums = {"loss": 0.0, "lm": 0.0, "aux": 0.0}
            finite, loads, seen = True, [], []
            for b in micro:
                with autocast:
                    lm, aux, z, out = self._losses(model, b, total_w, stage.max_len)
                moe = cfg.router_aux_loss_coef * aux + cfg.router_z_loss_coef * z  # averaged over micro-steps, ranks
                loss = lm + moe / (stage.grad_accum * self.world)
                if focus is not None and b.focus is not None:
                    got = focus_loss(model, b.focus.reshape(-1, stage.max_len), b.cu_seqlens, focus["layers"],
                                     focus.get("head", 0))
                    if got is not None:  # this rank's micro-batch mean, averaged like the MoE terms
                        loss = loss + focus["weight"] * got[0] / (stage.grad_accum * self.world)
                        seen.append((got[0].item(), got[1].item()))
                if not torch.isfinite(loss):
                    finite = False
                    if not sync:
                        break  # (ranks in sync go on: the non-finite gradient norm skips the step below)
                if loss.requires_grad:  # (no image in these rows while only the adapter trains: no gradient)
                    loss.backward()
                sums["loss"] += loss.item()
                sums["lm"] += lm.item()
                sums["aux"] += aux.item() / stage.grad_accum
                if out.router_logits:
                    loads.append(out.expert_load(cfg.num_experts, cfg.num_experts_per_tok)[0])
            if ddp:  # the step's gradient: the ranks' losses are shares of the global loss, so their sum
                D.all_reduce_grads(params)
            grad_norm = D.clip_grad_norm_(params, run.grad_clip) if finite or sync else torch.tensor(float("nan"))
            flag = D.all_reduce_sum(torch.tensor([0.0 if finite and torch.isfinite(grad_norm) else 1.0]))
            if flag.item() > 0:
                optimizer.zero_grad(set_to_none=True)
                if adalrs is not None:
                    adalrs.step(float("nan"))  # a trial that blows up rolls back
                bad += 1
                warnings.warn(f"stage {stage.name} step {step}: non-finite loss or gradient, step skipped "
                              f"({bad} in a row)", RuntimeWarning, stacklevel=2)
                if bad >= run.max_bad_steps:
                    raise TrainingError(f"stage {stage.name}: {bad} non-finite steps in a row at step {step}; "
                                        f"stopping (last checkpoint: {latest_checkpoint(ckpt_root)})")
                step += 1
                continue
            bad = 0
            scale = adalrs.lr_scale if adalrs is not None else 1.0
            set_lr(optimizer, lr_at(stage, step) * scale)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            n_tok, n_samples = sum(b.num_tokens for b in micro), sum(b.num_samples for b in micro)
            if sync:  # the global step: losses and counts summed over ranks (the aux loss averaged)
                tot = D.all_reduce_sum(torch.tensor([sums["loss"], sums["lm"], sums["aux"], n_tok, n_samples],
                                                    dtype=torch.float64))
                sums = {"loss": float(tot[0]), "lm": float(tot[1]), "aux": float(tot[2]) / self.world}
                n_tok, n_samples = int(tot[3]), int(tot[4])
            event = None
            if adalrs is not None:  # every rank sees the same (global) loss and takes the same decision
                event = adalrs.step(float(torch.tensor([sums["loss"]])[0]))
            step += 1
            tokens_seen += n_tok
            dt = time.perf_counter() - t0
            rec = {"stage": stage.name, "stage_index": si, "step": step, "loss": sums["loss"], "lm_loss": sums["lm"],
                   "lr": optimizer.param_groups[0]["lr"], "lr_scale": scale, "grad_norm": float(grad_norm),
                   "tokens": n_tok, "tokens_per_s": n_tok / dt,
                   "samples": n_samples, "pad_frac": packer.stats["padding_fraction"],
                   "tokens_seen": tokens_seen}
            if loads:
                rec.update(self._moe_stats(loads, sums["aux"]))
            if seen:  # (this rank's)
                rec["focus_nll"] = sum(a for a, _ in seen) / len(seen)
                rec["focus_mass"] = sum(m for _, m in seen) / len(seen)
            if event:
                rec["adalrs"] = event
            self._log(rec)
            progress.update(step, loss=sums["loss"], lr=rec["lr"], tok_s=int(rec["tokens_per_s"]))
            if step % run.checkpoint_every == 0 or step == stage.steps:
                state = {"step": step, "bad_steps": bad, "tokens_seen": tokens_seen, "packer": packer.state_dict(),
                         "adalrs": adalrs.state_dict() if adalrs is not None else None,
                         "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}
                save_train_state(ckpt_root, step, model, optimizer, state, keep=run.keep_checkpoints)
        if focus is not None:
            set_capture(model, focus["layers"], False)

    @staticmethod
    def _losses(model: SailVL, b: PackedBatch, total_w: torch.Tensor, row_len: int):
        """This micro-batch's share of the step loss: sum(w * ce) / (sum of w over the whole step). The packed
        rows run as a batch [rows, row_len] (attention per row), with cu_seqlens over all tokens."""
        rows = lambda t: t.reshape(-1, row_len)  # noqa: E731
        out = model(rows(b.input_ids), pixel_values=b.pixel_values, position_ids=rows(b.position_ids),
                    cu_seqlens=b.cu_seqlens, max_seqlen=b.max_seqlen, compute_logits=False,
                    token_mask=None if b.token_mask is None else rows(b.token_mask))
        ce, valid = model.labelled_token_losses(out.hidden, rows(b.labels), b.cu_seqlens)
        lm = (ce * rows(b.loss_weights)[:, 1:][valid]).sum() / total_w.clamp_min(1e-12)
        zero = lm.new_zeros(())
        return lm, out.aux_loss if out.aux_loss is not None else zero, out.z_loss if out.z_loss is not None else zero, out

    def _moe_stats(self, loads: list[torch.Tensor], aux: float) -> dict:
        load = D.all_reduce_sum(torch.stack(loads).mean(0)) / self.world  # [layers, E], averaged over ranks
        n = load.shape[-1]
        ent = -(load * load.clamp_min(1e-12).log()).sum(-1) / torch.log(torch.tensor(float(n)))
        return {"aux_loss": aux, "expert_entropy": [round(float(e), 4) for e in ent],
                "expert_entropy_mean": float(ent.mean())}

    # -------------------------------------------------------------------------------------- outputs
    def _export(self, model: SailVL, processor: Processor, tok_dir: Path, export: Path) -> None:
        model = gather_model(model)  # one process: the model itself; FSDP: the full weights on rank 0
        if D.is_main():
            model.save_pretrained(export)
            processor.save_pretrained(export, source_dir=tok_dir)
            (export / DONE).write_text("")
        D.barrier()

    def _log(self, rec: dict) -> None:
        if D.is_main():
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def _truncate_metrics(self, si: int, step: int) -> None:
        """Drop metrics logged after the checkpoint we resume from (they are about to be recomputed)."""
        if not D.is_main() or not self.metrics_path.exists():
            return
        keep = [line for line in self.metrics_path.read_text().splitlines()
                if line and not _after(json.loads(line), si, step)]
        self.metrics_path.write_text("".join(line + "\n" for line in keep))

    def _say(self, msg: str) -> None:
        if D.is_main() and not self.quiet:
            print(msg, flush=True)


def _after(rec: dict, si: int, step: int) -> bool:
    return rec.get("stage_index", -1) > si or (rec.get("stage_index") == si and rec.get("step", 0) > step)
