"""FSDP2 under torchrun (gloo, 2 CPU processes): the same global batch gives the same losses and updates as
one process; sharded checkpoints load exactly on another number of ranks (2 -> 1 and 1 -> 2) and resume;
stage exports of a 2-rank run load with SailVL.from_pretrained; the data position maps onto a new layout.

This file is also the torchrun worker (`python -m torch.distributed.run ... tests/test_distributed.py MODE`)."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sailvl.checkpoint.state import load_checkpoint, unflatten
from sailvl.config import tiny_config
from sailvl.data.loader import MixtureLoader
from sailvl.data.packing import StreamPacker
from sailvl.distributed.checkpoint import load_train_state, reshard_packer_state, save_train_state
from sailvl.distributed.parallelize import parallelize
from sailvl.model.vlm import SailVL
from sailvl.train.optim import apply_trainable, build_optimizer
from sailvl.train.stages import RunConfig, Stage
from sailvl.train.trainer import Trainer
from tests.test_train import losses, make_run, world  # noqa: F401 (world is a fixture)


ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def launch(args: list[str], nproc: int | None = 2, timeout: int = 180) -> subprocess.CompletedProcess:
    """Run `python -m torch.distributed.run --nproc-per-node N ARGS` (or `python ARGS` for nproc None) in its
    own process group; a hang is killed with all its workers."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] if nproc else []
    proc = subprocess.Popen([sys.executable, *launcher, *args], env=ENV, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {args}\n{out[-2000:]}\n{err[-4000:]}")
    assert proc.returncode == 0, out[-3000:] + err[-5000:]
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def one_row_buffer(monkeypatch=None) -> None:
    """Packers holding one sample: every packed row is the next sample of the rank's shard, so 2 ranks x 1 row
    per step train on exactly the rows 1 process x 2 rows per step does (rank r reads samples r, r+2, ...)."""
    from sailvl.train import trainer

    packer = functools.partial(StreamPacker, buffer_size=1)
    if monkeypatch is not None:
        monkeypatch.setattr(trainer, "StreamPacker", packer)
    else:
        trainer.StreamPacker = packer


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def write_run(run: RunConfig, path: Path) -> Path:
    path.write_text(json.dumps(run.to_dict()))
    return path


def assembled(dcp_dir: Path) -> dict[str, torch.Tensor]:
    """Full tensors from the ranks' DCP safetensors files, placed by the shard offsets in their headers
    (read independently of torch.distributed.checkpoint)."""
    chunks: dict[str, list] = {}
    for f in sorted(dcp_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            offsets = json.loads(fh.metadata()["DCP_SHARDING_INFO"])
            for k in fh.keys():  # noqa: SIM118
                chunks.setdefault(k, []).append((offsets[k]["saved_offsets"], fh.get_tensor(k)))
    out = {}
    for k, parts in chunks.items():
        shape = [max(o[d] + t.shape[d] for o, t in parts) for d in range(parts[0][1].dim())]
        full = torch.full(shape, float("nan"), dtype=parts[0][1].dtype)
        for o, t in parts:
            full[tuple(slice(a, a + n) for a, n in zip(o, t.shape))] = t
        out[k] = full
    return out


def optimizer_by_name(model, optimizer) -> dict[str, dict[str, torch.Tensor]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: dict(optimizer.state[p]) for g in optimizer.param_groups for p in g["params"]}


# ------------------------------------------------------------------------------------------------- tests
# Muon: each rank gathers a matrix's momentum whole, iterates in bf16 and keeps its shard of the update
TOLERANCE = {"adamw": dict(loss=1e-5, grad=1e-5, weight=1e-4), "muon": dict(loss=1e-4, grad=1e-4, weight=1e-3)}


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_same_global_batch_same_loss_and_update(world, tmp_path, monkeypatch, optimizer):  # noqa: F811
    """1 process x 2 rows per step vs 2 ranks x 1 row: same rows (see one_row_buffer), fp32. Stage 1 trains
    the adapter only (frozen ViT and LLM inside FSDP units), stage 2 everything; the 2-rank run also uses
    activation checkpointing, and some of its micro-batches have no image on one rank (blank-image path)."""
    tol = TOLERANCE[optimizer]
    one = make_run(world, tmp_path / "one")
    for s in one.stages:
        s.optimizer = optimizer
    one_row_buffer(monkeypatch)
    Trainer(one, quiet=True).fit()
    two = make_run(world, tmp_path / "two", activation_checkpointing=True)
    for s in two.stages:
        s.rows_per_step = 1  # per rank
        s.optimizer = optimizer
    launch([__file__, "train-one-row-buffer", str(write_run(two, tmp_path / "two.json"))])
    a, b = records(tmp_path / "one" / "t"), records(tmp_path / "two" / "t")
    def key(r):
        return r["stage"], r["step"], r["tokens"], r["samples"]

    assert [key(r) for r in a] == [key(r) for r in b]  # the same global batches, summed over ranks
    for x, y in zip(a, b):  # measured (AdamW): <= 2.3e-7 relative (loss), <= 7e-7 (grad norm)
        assert abs(x["loss"] - y["loss"]) <= tol["loss"] * abs(x["loss"]), (x, y)
        assert abs(x["grad_norm"] - y["grad_norm"]) <= tol["grad"] * x["grad_norm"], (x, y)
    for st in ("00_warm", "01_all"):  # the same updates: 3 + 5 steps (measured max |diff|, AdamW: 1.2e-5)
        wa = SailVL.from_pretrained(tmp_path / "one" / "t" / st / "model").state_dict()
        wb = SailVL.from_pretrained(tmp_path / "two" / "t" / st / "model").state_dict()
        assert wa.keys() == wb.keys()
        for k in wa:
            if st == "00_warm" and not k.startswith("mlp1."):
                assert torch.equal(wa[k], wb[k]), k  # frozen: untouched by both
            torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=tol["weight"], msg=k)


def with_vision_stage(run: RunConfig, images: int) -> RunConfig:
    """Prepend a SAIL-ViT dense pretraining stage (kind vision) of 3 steps x `images` images (per rank)."""
    vit = tiny_config().vision_config
    synth = {"image_size": vit.image_size, "max_objects": 2}
    run.stages.insert(0, Stage("dense", 3, [], kind="vision", trainable=["vit"], lr={"vit": 1e-3}, rows_per_step=images,
                               warmup_steps=1, vision={"world": synth, "kinds": {"scene": 1, "glyph": 1}}))
    return run


def test_ddp_same_global_batch_same_loss_and_update(world, tmp_path, monkeypatch):  # noqa: F811
    """parallel="ddp" (the whole model on each rank, gradients all-reduced once per step), fp32: 1 process vs
    2 ranks on the same global batches, with a vision stage first (each rank draws its half of the step's
    images; the image-level character loss is normalised over the step's images, not the rank's)."""
    one = with_vision_stage(make_run(world, tmp_path / "one"), images=8)
    one_row_buffer(monkeypatch)
    Trainer(one, quiet=True).fit()
    two = with_vision_stage(make_run(world, tmp_path / "two", parallel="ddp"), images=4)
    for s in two.stages[1:]:
        s.rows_per_step = 1  # per rank
    launch([__file__, "train-one-row-buffer", str(write_run(two, tmp_path / "two.json"))])
    a, b = records(tmp_path / "one" / "t"), records(tmp_path / "two" / "t")
    assert [(r["stage"], r["step"], r.get("tokens"), r.get("images")) for r in a] == \
        [(r["stage"], r["step"], r.get("tokens"), r.get("images")) for r in b]
    assert [r["stage"] for r in a][:3] == ["dense"] * 3
    for x, y in zip(a, b):  # measured: <= 8e-8 relative (loss), <= 1.2e-7 (grad norm)
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(x["loss"]), (x, y)
        assert abs(x["grad_norm"] - y["grad_norm"]) <= 1e-5 * x["grad_norm"], (x, y)
    for st in ("00_dense", "01_warm", "02_all"):  # measured max |diff| 1.9e-8, 6.5e-7, 1.3e-5
        wa = SailVL.from_pretrained(tmp_path / "one" / "t" / st / "model").state_dict()
        wb = SailVL.from_pretrained(tmp_path / "two" / "t" / st / "model").state_dict()
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-4, msg=k)
    ha = load_file(str(tmp_path / "one" / "t" / "00_dense" / "vision_heads.safetensors"))
    hb = load_file(str(tmp_path / "two" / "t" / "00_dense" / "vision_heads.safetensors"))
    for k in ha:
        torch.testing.assert_close(hb[k], ha[k], rtol=0, atol=1e-4, msg=k)


def test_ddp_checkpoint_resumes_on_one_process_exactly(world, tmp_path):  # noqa: F811
    """A 2-rank ddp run (bf16 autocast) killed after a checkpoint of each stage resumes on one process; the
    checkpoint holds no pickle, and the resumed model equals the checkpoint's."""
    run = with_vision_stage(make_run(world, tmp_path, precision="bf16", parallel="ddp"), images=4)
    run.stages[2].steps = 4  # checkpoints at steps 2 and 4
    cfg = write_run(run, tmp_path / "run.json")
    launch(["-m", "sailvl", "train", str(cfg)])
    t = tmp_path / "t"
    for st in ("00_dense", "01_warm", "02_all"):
        SailVL.from_pretrained(t / st / "model")
    ckpt = t / "02_all" / "checkpoints" / "step_00000004"
    assert not [p for p in ckpt.rglob("*") if p.suffix in (".pt", ".pkl", ".bin")]
    saved = assembled(ckpt / "dcp")
    exported = SailVL.from_pretrained(t / "02_all" / "model").state_dict()
    for k, v in exported.items():
        assert torch.equal(v, saved[f"model.{k}"]), k
    shutil.rmtree(t / "02_all" / "model")
    r = launch(["-m", "sailvl", "train", str(cfg), "stages.all.steps=6", "--resume"], nproc=None)
    assert f"resumed from {ckpt}" in r.stdout
    assert [(s, i) for s, i, _ in losses(t)] == [("dense", i) for i in (1, 2, 3)] + \
        [("warm", i) for i in (1, 2, 3)] + [("all", i) for i in range(1, 7)]


def test_two_rank_checkpoint_loads_exactly_and_resumes_on_one_process(world, tmp_path):  # noqa: F811
    run = make_run(world, tmp_path, precision="bf16")  # bf16: FSDP's mixed-precision policy
    run.stages[1].steps = 4  # checkpoints at steps 2 and 4 of each stage
    cfg = write_run(run, tmp_path / "run.json")
    launch(["-m", "sailvl", "train", str(cfg)])
    t = tmp_path / "t"
    for st in ("00_warm", "01_all"):  # the stage exports are complete SAIL-VL2 directories
        assert (t / st / "model" / "DONE").exists()
        SailVL.from_pretrained(t / st / "model")
    ckpt = t / "01_all" / "checkpoints" / "step_00000004"
    files = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())
    assert files == ["complete.json", "dcp/shard-00001-model-00001-of-00001.safetensors",
                     "dcp/shard-00002-model-00001-of-00001.safetensors", "rank0.json", "rank0.safetensors",
                     "rank1.json", "rank1.safetensors", "sharded.json"]  # no pickle anywhere

    # one process loads exactly what the two ranks saved
    stage = run.stages[1]
    model = SailVL(run.model)
    apply_trainable(model, stage)
    optimizer = build_optimizer(model, stage)
    state = load_train_state(ckpt, model, optimizer)
    assert state["step"] == 4 and state["packer"]["loader"]["world_size"] == 1  # visual packing: global stream
    saved = assembled(ckpt / "dcp")
    exported = SailVL.from_pretrained(t / "01_all" / "model").state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, exported[k]) and torch.equal(v, saved[f"model.{k}"]), k
    opt = optimizer_by_name(model, optimizer)
    assert len(opt) == len(list(model.parameters()))
    for name, per_param in opt.items():
        assert per_param.keys() == {"step", "exp_avg", "exp_avg_sq"}
        for k, v in per_param.items():
            assert torch.equal(v, saved[f"optim.{name}.{k}"]), (name, k)
    groups = unflatten(json.loads((ckpt / "sharded.json").read_text())["param_groups"], {})
    assert [{k: v for k, v in g.items() if k != "params"} for g in groups] == \
        [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]  # lr, betas, ...

    # and resumes there: as if killed after the last checkpoint, with 2 more steps
    shutil.rmtree(t / "01_all" / "model")
    r = launch(["-m", "sailvl", "train", str(cfg), "stages.all.steps=6", "--resume"], nproc=None)
    assert f"resumed from {ckpt}" in r.stdout
    assert "written by 2 rank(s) and is resumed on 1" in r.stderr
    assert [(s, i) for s, i, _ in losses(t)] == [("warm", i) for i in (1, 2, 3)] + [("all", i) for i in range(1, 7)]
    SailVL.from_pretrained(t / "01_all" / "model")


def test_two_rank_resume_on_two_ranks_continues_the_exact_loss_curve(world, tmp_path):  # noqa: F811
    """Resumed from step 4 of stage "all", where an AdaLRS trial is live (its rollback snapshot holds this
    rank's shards), the rerun of steps 5-7 (AdaLRS decides at step 6) gives bit-identical metrics."""
    run = make_run(world, tmp_path, keep_checkpoints=10)
    run.stages[1].steps = 7
    run.stages[1].adalrs = {"window": 3, "keep_z": 1e9, "rollback_z": 0.0}
    cfg = write_run(run, tmp_path / "run.json")
    launch(["-m", "sailvl", "train", str(cfg)])
    t = tmp_path / "t"
    full = records(t)
    events = [r.get("adalrs") for r in full if r["stage"] == "all"]
    assert events[:5] == [None, None, "trial", None, None] and events[5] in ("rollback", "reject")  # (now: rollback)
    ckpts = t / "01_all" / "checkpoints"
    assert json.loads((ckpts / "step_00000004" / "rank1.json").read_text())  # per-rank state
    for name in ("step_00000006", "step_00000007"):
        shutil.rmtree(ckpts / name)
    shutil.rmtree(t / "01_all" / "model")
    r = launch(["-m", "sailvl", "train", str(cfg), "--resume"])
    assert f"resumed from {ckpts / 'step_00000004'}" in r.stdout
    again = records(t)
    drop = ("tokens_per_s",)  # a timing
    assert [{k: v for k, v in x.items() if k not in drop} for x in again] == \
        [{k: v for k, v in x.items() if k not in drop} for x in full]


def test_one_process_checkpoint_loads_exactly_on_two_ranks(world, tmp_path):  # noqa: F811
    run = make_run(world, tmp_path, visual_packing=False)  # per-rank data shards: the loader layout changes
    run.stages = run.stages[1:]
    run.stages[0].steps = 2
    Trainer(run, quiet=True).fit()
    ckpt = tmp_path / "t" / "00_all" / "checkpoints" / "step_00000002"
    cfg = write_run(run, tmp_path / "run.json")
    # 2 ranks load the one-process checkpoint and write it again, sharded
    launch([__file__, "reload", str(cfg), str(ckpt), str(tmp_path / "resaved")])
    again = tmp_path / "resaved" / "step_00000002"
    for r in (0, 1):
        state = json.loads((again / f"rank{r}.json").read_text())
        assert f'["rank", {r}], ["world_size", 2]' in json.dumps(state)  # this rank's new loader layout
    # one process reads that back: identical to the original checkpoint (1 -> 2 -> 1, model and optimiser)
    model = SailVL(run.model)
    apply_trainable(model, run.stages[0])
    optimizer = build_optimizer(model, run.stages[0])
    load_train_state(again, model, optimizer)
    model_state, state = load_checkpoint(ckpt)
    for k, v in model.state_dict().items():
        assert torch.equal(v, model_state[k]), k
    original = state["optimizer"]
    mine = optimizer.state_dict()
    assert mine["param_groups"] == original["param_groups"]
    for i, per_param in original["state"].items():
        for k, v in per_param.items():
            assert torch.equal(mine["state"][i][k], v), (i, k)

    # and a real resume on 2 ranks continues the run
    shutil.rmtree(tmp_path / "t" / "00_all" / "model")
    r = launch(["-m", "sailvl", "train", str(cfg), "stages.all.steps=4", "--resume"])
    assert f"resumed from {ckpt}" in r.stdout
    assert [(s, i) for s, i, _ in losses(tmp_path / "t")] == [("all", i) for i in range(1, 5)]
    SailVL.from_pretrained(tmp_path / "t" / "00_all" / "model")


class Numbers:
    """A Source of n records; record i is a sample of 1 + i % 5 tokens."""

    name = "numbers"

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def key(self, i: int) -> str:
        return str(i)

    def read(self, i: int) -> dict:
        return {"input_ids": [i] * (1 + i % 5), "labels": [i] * (1 + i % 5)}


@pytest.mark.parametrize("old,new", [(2, 1), (1, 2), (2, 3)])
def test_data_position_continues_the_epoch_on_a_new_layout(old, new):
    """The old ranks train different numbers of batches; after resharding, the new ranks finish the epoch:
    the records they read up to the end of their epoch-0 shards, with the buffered ones, complete the epoch."""
    n, buffer = 101, 4

    def packer(rank, size):
        loader = MixtureLoader([(Numbers(n), 1.0)], seed=3, rank=rank, world_size=size)
        return StreamPacker(loader, max_len=8, buffer_size=buffer, max_wait_rows=1)  # ~first in, first out

    trained, states = [], []
    for r in range(old):
        p = packer(r, old)
        batches = iter(p)
        for _ in range(7 + 2 * r):
            trained += [i for _, i in next(batches).refs]
        states.append(p.state_dict())
    assert len(trained) == len(set(trained)) < n
    after = []
    for r in range(new):
        p = packer(r, new)
        state = reshard_packer_state(states, p.state_dict())
        cursor = state["loader"]["sources"][0]
        assert cursor["epoch"] == 0 and state["loader"]["rank"] == r and state["loader"]["world_size"] == new
        todo = len(range(r, n, new)) - cursor["pos"] + len(state["buffer"]) + buffer  # + what the buffer holds back
        p.load_state_dict(state)
        mine: list[int] = []
        batches = iter(p)
        while len(mine) < todo:
            mine += [i for _, i in next(batches).refs]
        after += mine[:todo]
    assert set(trained) | set(after) == set(range(n))  # no record of the epoch skipped
    assert len(trained) + len(after) - n <= 2 * buffer * (old + new) + 4 * old  # few read twice


def test_global_stream_position_continues_exactly_on_a_new_layout():
    """Visual packing: every rank packs the one global stream, so its position moves to any number of ranks
    exactly: one process continues with the very rows the two ranks would have trained next."""
    def packer(balance=None):
        loader = MixtureLoader([(Numbers(101), 1.0)], seed=3)
        return StreamPacker(loader, max_len=8, buffer_size=4, balance=balance)

    old = [packer((r, 2)) for r in range(2)]
    its = [iter(p) for p in old]
    for it in its:
        for _ in range(5):
            next(it)
    states = [p.state_dict() for p in old]
    next_rows = sorted(tuple(ref) for it in its for _ in range(2) for ref in next(it).refs)
    one = packer()
    one.load_state_dict(reshard_packer_state(states, one.state_dict()))
    it = iter(one)
    assert sorted(tuple(ref) for _ in range(4) for ref in next(it).refs) == next_rows
    sharded = StreamPacker(MixtureLoader([(Numbers(101), 1.0)], seed=3, rank=0, world_size=2), max_len=8,
                           buffer_size=4)
    with pytest.raises(ValueError, match="visual packing"):
        reshard_packer_state([sharded.state_dict(), states[0]], one.state_dict())


def test_a_live_adalrs_trial_is_abandoned_on_a_new_layout():
    from sailvl.distributed.checkpoint import _reshard_state
    from sailvl.train.adalrs import AdaLRS, AdaLRSConfig

    model = torch.nn.Linear(3, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    ada = AdaLRS(AdaLRSConfig(window=3), model, optimizer)
    assert [ada.step(x) for x in (3.0, 2.0, 1.0)][-1] == "trial"
    saved = {"step": 3, "rng": {}, "adalrs": ada.state_dict()}
    with pytest.warns(RuntimeWarning, match="AdaLRS trial .* abandoned"):
        state = _reshard_state([saved, saved], None, Path("ckpt"))  # 2 ranks -> this one process
    fresh = AdaLRS(AdaLRSConfig(window=3), model, optimizer)
    fresh.load_state_dict(state["adalrs"])
    assert fresh.phase == "baseline" and fresh.lr_scale == 1.0 and fresh.snapshot is None


# -------------------------------------------------------------------------------------------- the worker
def main() -> None:
    mode, *args = sys.argv[1:]
    if mode == "train-one-row-buffer":  # RUN_JSON
        one_row_buffer()
        Trainer(RunConfig.from_dict(json.loads(Path(args[0]).read_text())), quiet=True).fit()
    elif mode == "reload":  # RUN_JSON CHECKPOINT OUT_ROOT: load the first stage's checkpoint, save it again
        run = RunConfig.from_dict(json.loads(Path(args[0]).read_text()))
        trainer = Trainer(run, resume=True, quiet=True)
        model, processor, _ = trainer._start()
        stage = run.stages[0]
        apply_trainable(model, stage)
        parallelize(model, run.precision)
        optimizer = build_optimizer(model, stage)
        packer = trainer._data(0, stage, processor)
        state = load_train_state(args[1], model, optimizer, packer)
        packer.load_state_dict(state["packer"])
        save_train_state(args[2], state["step"], model, optimizer, {**state, "packer": packer.state_dict()})
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
