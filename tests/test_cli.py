import subprocess
import sys

from sailvl.cli import main
from sailvl.data.synth import TASKS


def test_help_lists_subcommands():
    r = subprocess.run([sys.executable, "-m", "sailvl", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for cmd in ("demo", "convert", "train", "eval", "chat", "caption", "serve"):
        assert cmd in r.stdout


def test_unknown_subcommand_is_a_clear_error():
    r = subprocess.run([sys.executable, "-m", "sailvl", "frobnicate"], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice: 'frobnicate'" in r.stderr


def test_quick_demo_runs_end_to_end(tmp_path, capsys):
    import json

    import sailvl

    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "overall accuracy" in out and "chat, image 2 (thinking)" in out
    report = json.loads((tmp_path / "demo-quick" / "demo_report.json").read_text())
    assert len(report["tasks"]) == len(TASKS) and 0.0 <= report["accuracy"] <= 1.0
    assert set(report["stage_times_s"]) == {"vit_dense", "vit_read", "vit_warmup", "vit_finegrained",
                                            "vit_world", "pretrain_basic", "pretrain_multitask", "sft", "longcot_sft",
                                            "think_fusion_sft"}
    pipe = sailvl.load(report["final_model"])  # an ordinary SAIL-VL2 model directory
    assert isinstance(pipe.chat(None, "hello", max_new_tokens=4), str)


def test_data_tokenizer_trains_from_txt_and_jsonl(tmp_path):
    import json

    from sailvl.data.tokenizer import load_tokenizer

    (tmp_path / "a.txt").write_text("the red circle\nthe blue square\n" * 20)
    (tmp_path / "b.jsonl").write_text(json.dumps({"conversations": [
        {"from": "human", "value": "<image>\nwhat colour?"}, {"from": "gpt", "value": "purple"}]}) + "\nnot json\n")
    out = tmp_path / "tok"
    assert main(["data", "tokenizer", "--corpus", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"),
                 "--vocab-size", "320", "--out", str(out)]) == 0
    tok = load_tokenizer(out)
    for t in ("<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<think>", "</think>", "<|endoftext|>"):
        assert tok.token_to_id(t) is not None
    ids = tok.encode("<|im_start|>user\n<IMG_CONTEXT><IMG_CONTEXT>purple").ids
    assert ids[0] == tok.token_to_id("<|im_start|>") and ids.count(tok.token_to_id("<IMG_CONTEXT>")) == 2
    assert main(["data", "tokenizer", "--corpus", str(tmp_path / "missing.txt"), "--vocab-size", "300",
                 "--out", str(out)]) == 1


def test_data_synth_writes_disjoint_splits_readable_by_the_loader(tmp_path, bpe_dir):
    from sailvl.data.processor import Processor, ProcessorConfig
    from sailvl.data.sources import JsonlSource
    from sailvl.data.tokenizer import load_tokenizer

    assert main(["data", "synth", "--out", str(tmp_path), "--n", "60", "--n-eval", "20", "--seed", "3"]) == 0
    train, test = JsonlSource(tmp_path / "train.jsonl"), JsonlSource(tmp_path / "test.jsonl")
    assert len(train) == 60 and len(test) == 20
    proc = Processor(load_tokenizer(bpe_dir), ProcessorConfig(image_size=64, patch_size=8, max_dynamic_patch=1))
    for i in range(len(train)):  # every synthetic record is a valid training sample
        out = proc.encode_sample(train.read(i))
        assert (out["labels"] != -100).any()
    assert main(["data", "synth", "--out", str(tmp_path), "--n", "5", "--tasks", "nope"]) == 1


def test_soup_cli_and_train_cli_errors(tmp_path, capsys):
    import torch

    from sailvl import SailVL
    from tests.conftest import make_model

    for i in range(2):
        torch.manual_seed(i)
        make_model().save_pretrained(tmp_path / f"m{i}")
    assert main(["soup", str(tmp_path / "m0"), str(tmp_path / "m1"), "--out", str(tmp_path / "s")]) == 0
    a, b = SailVL.from_pretrained(tmp_path / "m0"), SailVL.from_pretrained(tmp_path / "m1")
    s = SailVL.from_pretrained(tmp_path / "s")
    assert torch.allclose(s.mlp1[1].weight, (a.mlp1[1].weight + b.mlp1[1].weight) / 2, atol=1e-6)
    assert main(["train", "tinny"]) == 1
    assert "did you mean 'tiny'" in capsys.readouterr().err
    assert main(["train", "tiny", "--dry-run", "stages.sft.stepz=3"]) == 1
    assert "did you mean 'steps'" in capsys.readouterr().err
    assert main(["train", "tiny", "--dry-run", "scale=0.5", "stages.sft.steps=7"]) == 0
    assert "sft                        7 steps" in capsys.readouterr().out


def test_plot_writes_png(tmp_path):
    import json

    recs = [{"stage": s, "stage_index": i, "step": k, "loss": 2.0 / k, "lr": 1e-3, "tokens_per_s": 100.0}
            for i, s in enumerate(["a", "b"]) for k in range(1, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main(["plot", str(tmp_path)]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(tmp_path / "nope")]) == 1


def test_demo_training_processes_split_every_step_or_refuse(tmp_path, capsys):
    import pytest

    from sailvl.demo import _train
    from sailvl.recipes.tiny import tiny

    run = tiny(data_dir=str(tmp_path / "data"), out_dir=str(tmp_path))
    run.stages[3].rows_per_step = 5
    with pytest.raises(ValueError, match=f"stage {run.stages[3].name}: 5 rows per step do not split over 2"):
        _train(run, resume=False, procs=2)
    assert main(["demo", "--procs", "0", "--out", str(tmp_path)]) != 0
    assert "procs must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()  # refused before generating anything
