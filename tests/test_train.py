"""The trainer: stages as data, freezing, loss normalisation, non-finite steps, exact resume after kill -9."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sailvl.config import tiny_config
from sailvl.data.synth import generate
from sailvl.data.tokenizer import corpus_texts, train_bpe
from sailvl.model.vlm import SailVL
from sailvl.train.stages import DataSpec, RunConfig, Stage
from sailvl.train.trainer import Trainer, TrainingError


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    generate(d, 300, seed=1, tasks=["caption", "vqa_color", "vqa_count", "ocr", "math_cot", "text_instruct"])
    train_bpe(corpus_texts([d / "train.jsonl"]), 400, d / "tok")
    return d


def make_run(world, out, **kw) -> RunConfig:
    cfg = tiny_config(vocab_size=400)
    common = dict(max_len=256, rows_per_step=2, grad_accum=1, warmup_steps=1)
    stages = [Stage("warm", 3, [DataSpec(str(world / "train.jsonl"))], trainable=["adapter"], lr={"adapter": 1e-3},
                    **common),
              Stage("all", 5, [DataSpec(str(world / "train.jsonl"))], lr={"vit": 5e-4, "adapter": 5e-4, "llm": 5e-4},
                    **common)]
    run = RunConfig(name="t", model=cfg, tokenizer=str(world / "tok"), out_dir=str(out), stages=stages,
                    precision="fp32", checkpoint_every=2, log_every=1)
    for k, v in kw.items():
        setattr(run, k, v)
    return run


def losses(run_dir: Path) -> list[tuple[str, int, float]]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"], r["loss"]) for r in recs]


def test_stages_run_export_and_freeze(world, tmp_path):
    run = make_run(world, tmp_path)
    final = Trainer(run, quiet=True).fit()
    assert final == tmp_path / "t" / "01_all" / "model" and (final / "DONE").exists()
    warm = SailVL.from_pretrained(tmp_path / "t" / "00_warm" / "model")
    torch.manual_seed(run.seed)
    init = SailVL(run.model)  # the same seeded init the trainer made
    for name, p in warm.state_dict().items():  # the adapter-only stage changed the adapter and nothing else
        assert torch.equal(p, init.state_dict()[name]) != name.startswith("mlp1."), name
    recs = losses(tmp_path / "t")
    assert [(s, i) for s, i, _ in recs] == [("warm", i) for i in range(1, 4)] + [("all", i) for i in range(1, 6)]
    assert (final / "tokenizer.json").exists() and (final / "preprocessor_config.json").exists()
    assert json.loads((tmp_path / "t" / "run.json").read_text())["stages"][1]["name"] == "all"
    with pytest.raises(ValueError, match="already holds a run"):
        Trainer(make_run(world, tmp_path), quiet=True).fit()


def test_grad_accum_equals_bigger_micro_batch(world, tmp_path):
    """The loss is normalised over the whole step: 2 micro-batches of 1 row == 1 micro-batch of 2 rows."""
    a = make_run(world, tmp_path / "a")
    b = make_run(world, tmp_path / "b")
    for s in b.stages:
        s.rows_per_step, s.grad_accum = 1, 2
    Trainer(a, quiet=True).fit()
    Trainer(b, quiet=True).fit()
    la, lb = losses(tmp_path / "a" / "t"), losses(tmp_path / "b" / "t")
    assert [x[:2] for x in la] == [x[:2] for x in lb]
    for (_, _, x), (_, _, y) in zip(la, lb):
        assert abs(x - y) <= 1e-4 * max(1.0, abs(x))


def test_non_finite_steps_are_skipped_then_stop(world, tmp_path, monkeypatch):
    calls = {"n": 0}
    orig = Trainer._losses

    def flaky(model, b, total_w, row_len):
        calls["n"] += 1
        lm, aux, z, out = orig(model, b, total_w, row_len)
        return (lm * float("nan") if calls["n"] == 2 else lm), aux, z, out

    monkeypatch.setattr(Trainer, "_losses", staticmethod(flaky))
    run = make_run(world, tmp_path)
    with pytest.warns(RuntimeWarning, match="non-finite loss or gradient, step skipped"):
        Trainer(run, quiet=True).fit()
    assert len([r for r in losses(tmp_path / "t") if r[0] == "warm"]) == 2  # step 2 skipped, not logged

    monkeypatch.setattr(Trainer, "_losses", staticmethod(lambda m, b, w, r: (lambda o: (o[0] * float("inf"),) + o[1:])(
        orig(m, b, w, r))))
    run = make_run(world, tmp_path / "bad", max_bad_steps=2)
    with pytest.raises(TrainingError, match="2 non-finite steps in a row"), pytest.warns(RuntimeWarning):
        Trainer(run, quiet=True).fit()


def test_missing_init_and_tokenizer_are_clear_errors(world, tmp_path):
    run = make_run(world, tmp_path)
    run.stages[1].init_from = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="starts from .*nowhere, which does not exist"):
        Trainer(run, quiet=True).fit()
    run = make_run(world, tmp_path / "x", tokenizer=str(tmp_path))
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Trainer(run, quiet=True).fit()


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_kill_9_then_resume_continues_the_exact_loss_curve(world, tmp_path, optimizer):
    run = make_run(world, tmp_path / "killed")
    for s in run.stages:
        s.steps += 4  # long enough to be killed in the middle of stage "all"
        s.optimizer = optimizer
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps(run.to_dict()))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "sailvl", "train", str(cfg)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "t" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any('"stage": "all", "stage_index": 1, "step": 5' in line
                                    for line in metrics.read_text().splitlines()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpts = tmp_path / "killed" / "t" / "01_all" / "checkpoints"
    (ckpts / "step_00000099").mkdir()  # a half-written checkpoint (no complete.json) is never picked
    (ckpts / ".tmp-step_00000100-1").mkdir()
    r = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout
    got = losses(tmp_path / "killed" / "t")
    uninterrupted = make_run(world, tmp_path / "full")
    for s in uninterrupted.stages:
        s.steps += 4
        s.optimizer = optimizer
    Trainer(uninterrupted, quiet=True).fit()
    assert got == losses(tmp_path / "full" / "t")  # bit-identical floats, same steps, no duplicates


def test_tiny_data_is_reused_only_when_prepared_the_same_way(tmp_path, capsys):
    from sailvl.recipes.tiny import prepare_tiny, tiny

    run = tiny(data_dir=str(tmp_path / "data"), out_dir=str(tmp_path))
    prepare_tiny(run, n_train=80, n_eval=19, seed=0)
    train = tmp_path / "data" / "train.jsonl"
    first, stamp = train.read_text(), train.stat().st_mtime_ns
    prepare_tiny(run, n_train=80, n_eval=19, seed=0)
    assert train.stat().st_mtime_ns == stamp  # same request: reused, not regenerated
    prepare_tiny(run, n_train=80, n_eval=19, seed=1)
    assert "prepared differently" in capsys.readouterr().out
    assert train.read_text() != first  # another seed: regenerated
    assert json.loads((tmp_path / "data" / "READY").read_text())["seed"] == 1


def test_tiny_thinking_stages_bring_no_new_data():
    """Every data group of the tiny recipe's thinking stages (longcot_sft, think_fusion_sft) is in the mixture of an
    earlier VLM stage: a group first met there (math_cot's traces once were) starts that stage at a loss above a
    uniform guess and costs the task most of what it learns (session 21)."""
    from sailvl.recipes.tiny import tiny

    run = tiny()
    names = [s.name for s in run.stages]
    first = names.index("longcot_sft")
    earlier = {d.name for s in run.stages[:first] if s.kind == "vlm" for d in s.data}
    for stage in run.stages[first:]:
        assert {d.name for d in stage.data} <= earlier, (stage.name, {d.name for d in stage.data} - earlier)
    assert "math_cot" in earlier


def test_tiny_stages_read_only_what_prepare_tiny_writes_and_use_all_of_it(tmp_path):
    """Every data group a tiny stage names is a file prepare_tiny writes (a view of train or an extra split), and
    every extra split is read by some stage (a split no stage reads is generation time spent for nothing)."""
    from sailvl.recipes.tiny import EXTRA, GROUPS, group_path, tiny

    run = tiny(data_dir=str(tmp_path))
    used = {d.name for s in run.stages for d in s.data}
    assert used <= set(GROUPS) | set(EXTRA), used - set(GROUPS) - set(EXTRA)
    assert set(EXTRA) <= used, set(EXTRA) - used
    for s in run.stages:
        assert all(d.path == group_path(str(tmp_path), d.name) and d.weight > 0 for d in s.data), s.name
    # the SAIL-ViT stages draw their images in memory; every other stage reads JSONL
    assert [s.name for s in run.stages if not s.data] == ["vit_dense", "vit_read"]


def test_trainable_names_finer_modules_than_vit_adapter_llm():
    """A stage's trainable list may name any module by its parameter-name prefix (here the LLM's blocks and final
    norm, the tied embeddings / head left out), not only the vit / adapter / llm groups; a name that is neither, or a
    prefix no parameter has, is an error."""
    from sailvl.train.optim import apply_trainable

    model = SailVL(tiny_config())
    data = [DataSpec("unused.jsonl")]
    stage = Stage("blocks", 1, data, trainable=["language_model.model.layers", "language_model.model.norm"])
    n_train, n_total = apply_trainable(model, stage)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert 0 < n_train < n_total and n_train == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trained == {n for n, _ in model.named_parameters()
                       if n.startswith(("language_model.model.layers.", "language_model.model.norm."))}
    assert "language_model.model.embed_tokens.weight" not in trained
    with pytest.raises(ValueError, match="not one of"):
        Stage("typo", 1, data, trainable=["langauge_model"])
    with pytest.raises(ValueError, match="trains nothing"):
        apply_trainable(model, Stage("none", 1, data, trainable=["language_model.model.layers.99."]))
