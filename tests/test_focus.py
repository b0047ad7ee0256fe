"""Attention supervision (focus): boxes -> token marks, records and packing carry them, the loss is the model's
own attention mass (checked against SDPA on one-hot values), and a training stage with it raises that mass."""

import json
import random

import pytest
import torch
import torch.nn.functional as F

from sailvl.config import tiny_config
from sailvl.data.focus import FOCUS_QUERY, FOCUS_TARGET, focus_marks, grid_cells, parse_focus
from sailvl.data.loader import MixtureLoader
from sailvl.data.packing import StreamPacker
from sailvl.data.processor import Processor, ProcessorConfig
from sailvl.data.records import parse_record
from sailvl.data.schema import SkipSample
from sailvl.data.sources import JsonlSource
from sailvl.data.synth import generate
from sailvl.data.synth.record import focus_objects
from sailvl.data.synth.registry import draw
from sailvl.data.synth.scene import Obj, grounding_box
from sailvl.data.synth.world import World
from sailvl.data.tokenizer import corpus_texts, load_tokenizer, train_bpe
from sailvl.model.vlm import SailVL
from sailvl.train.focus import focus_nll, set_capture
from sailvl.train.stages import DataSpec, RunConfig, Stage
from sailvl.train.trainer import Trainer

SCENE_TASKS = ["vqa_color", "vqa_shape", "vqa_count", "vqa_spatial", "vqa_compare", "vqa_yesno", "grounding"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("focus_world")
    generate(d, 200, seed=3, tasks=SCENE_TASKS + ["caption", "ocr"], world=World(focus=True))
    train_bpe(corpus_texts([d / "train.jsonl"]), 400, d / "tok")
    return d


def test_grid_cells_and_parse_focus():
    assert grid_cells([[0, 0, 250, 250]], 4) == [0]
    assert grid_cells([[0, 0, 1000, 1000]], 4) == list(range(16))
    assert grid_cells([[500, 750, 1000, 1000]], 4) == [14, 15]
    # a sliver under 10% of a cell does not count: x 240-510 covers column 1 wholly, 4% of column 0 and 2
    assert grid_cells([[240, 260, 510, 490]], 4) == [5]
    assert grid_cells([[100, 100, 200, 200], [800, 800, 900, 900]], 4) == [0, 15]
    assert parse_focus([[1, 2, 3, 4]]) == [[1.0, 2.0, 3.0, 4.0]]
    for bad in ([], [[1, 2, 3]], [[5, 5, 5, 9]], [[0, 0, 1001, 10]], "x", [[0, 0, True, 10]]):
        with pytest.raises(ValueError):
            parse_focus(bad)


def test_records_name_the_objects_their_answer_is_about():
    w = World(focus=True)
    rng = random.Random(0)
    seen = set()
    for _ in range(300):
        task = rng.choice(SCENE_TASKS + ["caption", "scene_qa", "ocr"])
        rec, _ = draw(task, rng, w)
        scene = [Obj.from_dict(o) for o in rec["meta"].get("scene", [])]
        objs = focus_objects(rec)
        if task in ("caption", "scene_qa", "ocr"):
            assert "focus" not in rec and objs == []
            continue
        m = rec["meta"]
        if task in ("vqa_color", "vqa_shape", "grounding"):
            assert objs == [m["target"]]
            answer = {"vqa_color": scene[m["target"]].colour, "vqa_shape": scene[m["target"]].shape}.get(task)
            assert answer is None or rec["answer"] == answer
        elif task in ("vqa_spatial", "vqa_compare"):
            assert objs == [m["a"], m["b"]]
        elif task == "vqa_count":
            assert len(objs) == int(rec["answer"])
        elif task == "vqa_yesno" and m.get("kind") not in ("relation", "colour"):
            assert (len(objs) > 0) == (rec["answer"] == "yes")
        if objs:
            assert rec["focus"] == [grounding_box(scene[i], w.image_size) for i in objs]
            seen.add(task)
        else:
            assert "focus" not in rec
    assert seen == set(SCENE_TASKS)
    rec, _ = draw("vqa_color", random.Random(1), World())  # off by default
    assert "focus" not in rec


def test_malformed_focus_skips_the_record():
    rec = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    assert parse_record(dict(rec, focus=[[0, 0, 500, 500]]), lambda n, k: n).meta["focus"] == [[0, 0, 500, 500]]
    with pytest.raises(SkipSample, match="focus box"):
        parse_record(dict(rec, focus=[[0, 0, 500]]), lambda n, k: n)


def test_marks_sit_on_the_covered_image_tokens_and_the_answer_predictor(world):
    proc = Processor(load_tokenizer(world / "tok"), ProcessorConfig(image_size=64, patch_size=8, max_dynamic_patch=1))
    src = JsonlSource(world / "train.jsonl")
    checked = 0
    for i in range(len(src)):
        s = src.read(i)
        out = proc.encode_sample(s)
        marks = out.get("focus")
        assert (marks is not None) == ("focus" in s.meta), s.task
        if marks is None:
            continue
        ids, labels = out["input_ids"], out["labels"]
        image_pos = (ids == proc.img_context_id).nonzero().flatten()
        cells = grid_cells(s.meta["focus"], 4)
        assert (marks == FOCUS_TARGET).nonzero().flatten().tolist() == image_pos[cells].tolist()
        q = int((marks == FOCUS_QUERY).nonzero().flatten())
        assert labels[q] == -100 and labels[q + 1] != -100 and q > int(image_pos[-1])
        checked += 1
    assert checked > 50
    # a first image of several tiles has no grid of its own: no marks
    ids = torch.tensor([5, 9, 9, 7, 8])
    assert focus_marks(ids, torch.tensor([-100, -100, -100, -100, 8]), 9, 2 * 16, 16, [[0, 0, 500, 500]]) is None


def test_packer_carries_marks_in_sequence_order(world):
    proc = Processor(load_tokenizer(world / "tok"), ProcessorConfig(image_size=64, patch_size=8, max_dynamic_patch=1,
                                                                    max_length=256))
    loader = MixtureLoader([(JsonlSource(world / "train.jsonl"), 1.0)], seed=0, process=proc.encode_sample)
    packer = StreamPacker(loader, 256, rows_per_step=2)
    batch = next(iter(packer))
    assert batch.focus is not None and batch.focus.shape == batch.input_ids.shape
    bounds = [(s, e) for s, e in zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist())
              if batch.token_mask[0, s]]  # (not the padding segments)
    assert len(bounds) == len(batch.refs)
    for (src_i, idx), (s, e) in zip(batch.refs, bounds):
        item = proc.encode_sample(loader.sources[src_i].read(idx))
        want = item.get("focus", torch.zeros(len(item["input_ids"]), dtype=torch.int8))
        assert torch.equal(batch.focus[0, s:e], want)
    assert batch.to("cpu").focus.dtype == torch.int8


def test_focus_nll_is_minus_log_of_the_heads_real_attention_mass():
    """Against SDPA itself: attention over one-hot values returns the attention probabilities."""
    torch.manual_seed(0)
    B, H, G, L, K = 2, 4, 2, 12, 8
    q, k = torch.randn(B, H, L, K), torch.randn(B, G, L, K)
    cu = torch.tensor([0, 5, 12, 20, 24], dtype=torch.int32)  # 4 segments over the 2 rows of 12
    marks = torch.zeros(B * L, dtype=torch.int8)
    marks[[1, 2]] = FOCUS_TARGET  # sample 0: targets 1, 2; query 4
    marks[4] = FOCUS_QUERY
    marks[[13, 15]] = FOCUS_TARGET  # sample 2 (12..19): query 18
    marks[18] = FOCUS_QUERY
    for head in range(H):
        nll, mass = focus_nll(q, k, marks.view(B, L), cu, head)
        want = []
        for s, e, qpos, targets in ((0, 5, 4, [1, 2]), (12, 20, 18, [13, 15])):
            r, a, b = s // L, s % L, e - (s // L) * L
            qs, ks = q[r, head, a:b], k[r, head // (H // G), a:b]
            p = F.scaled_dot_product_attention(qs[None], ks[None], torch.eye(b - a)[None], is_causal=True)[0]
            want.append(p[qpos - s, [t - s for t in targets]].sum())
        torch.testing.assert_close(mass, torch.stack(want), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(nll, -torch.stack(want).log(), rtol=1e-5, atol=1e-5)
    empty, _ = focus_nll(q, k, torch.zeros(B, L, dtype=torch.int8), cu, 0)
    assert empty.shape == (0,)
    with pytest.raises(ValueError, match="head 4"):
        focus_nll(q, k, marks.view(B, L), cu, 4)


def test_the_kept_qk_is_what_attention_ran_on():
    torch.manual_seed(0)
    model = SailVL(tiny_config(vocab_size=64))
    set_capture(model, [1], True)
    ids = torch.randint(0, 60, (1, 10))
    out = model.language_model(ids, compute_logits=False)
    q, k = model.language_model.model.layers[1].self_attn.qk
    assert q.shape == (1, 4, 10, 16) and k.shape == (1, 2, 10, 16) and out.hidden.shape == (1, 10, 64)
    set_capture(model, [1], False)
    assert model.language_model.model.layers[1].self_attn.qk is None
    with pytest.raises(ValueError, match="focus layer 5"):
        set_capture(model, [5], True)


def test_a_focus_stage_raises_the_heads_mass_on_the_targets(world, tmp_path):
    common = dict(max_len=256, rows_per_step=2, warmup_steps=2, lr={"vit": 0.0, "adapter": 3e-3, "llm": 3e-3},
                  trainable=["adapter", "llm"], schedule="constant", data=[DataSpec(str(world / "train.jsonl"))])
    runs = {}
    for weight in (0.0, 1.0):
        stage = Stage("s", 20, focus={"weight": weight, "layers": [1], "head": 0}, **common)
        run = RunConfig(name=f"w{weight}", model=tiny_config(vocab_size=400), tokenizer=str(world / "tok"),
                        out_dir=str(tmp_path), stages=[stage], precision="fp32", checkpoint_every=1000)
        Trainer(run, quiet=True).fit()
        recs = [json.loads(x) for x in (tmp_path / f"w{weight}" / "metrics.jsonl").read_text().splitlines()]
        assert all("focus_mass" in r for r in recs)
        runs[weight] = sum(r["focus_mass"] for r in recs[-5:]) / 5
    assert runs[1.0] > runs[0.0] + 0.2, runs
    with pytest.raises(ValueError, match="focus must be"):
        Stage("bad", 1, focus={"weight": 1.0}, **common)
