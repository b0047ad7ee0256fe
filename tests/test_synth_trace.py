"""World(scene_trace="caption") and World(chart_trace="read"): scene and chart questions answered through a thinking
trace; the evaluation scoring a thinking reply on its answer; the text_recall drills (repeats and key=value lookups)
and text_induction's plain-text records."""

import json
import re

import pytest

from sailvl.data.synth import TASKS, sample
from sailvl.data.synth.record import TRACE_TASKS, to_sample
from sailvl.data.synth.scene import Obj, caption
from sailvl.data.synth.tasks_text import RECALL_SYMBOLS, chart_trace
from sailvl.data.synth.world import World
from sailvl.data.template import THINK_SUFFIX, parse_thinking
from sailvl.eval.synth import score


@pytest.mark.parametrize("seed", [0, 7])
def test_caption_trace_describes_the_scene_then_answers(seed):
    plain, traced = World(), World(scene_trace="caption")
    for task in sorted(TASKS):
        (a, ims_a), (b, ims_b) = sample(task, seed, world=plain), sample(task, seed, world=traced)
        assert a["answer"] == b["answer"] and a["meta"] == b["meta"]  # the same draw
        assert [im.tobytes() for im in ims_a] == [im.tobytes() for im in ims_b]
        if task not in TRACE_TASKS:
            assert a == b
            continue
        q, reply = b["conversations"][0]["value"], b["conversations"][1]["value"]
        assert q == a["conversations"][0]["value"] + THINK_SUFFIX
        thinking, answer = parse_thinking(reply)
        assert answer == a["answer"]
        m = a["meta"]
        if task == "multi_change":
            expect = "\n".join(f"{name}: {caption([Obj.from_dict(o) for o in m[key]], 64)}"
                               for name, key in (("First", "before"), ("Second", "after")))
        else:
            expect = caption([Obj.from_dict(o) for o in m["scene"]], 64)
        assert thinking == expect
        assert reply == f"<think>\n{expect}\n</think>\n\nThe answer is \\boxed{{{a['answer']}}}."
        to_sample(b, ims_b)  # still a valid sample


def test_scene_trace_is_checked():
    with pytest.raises(ValueError, match="scene_trace"):
        World(scene_trace="steps")


def test_a_thinking_reply_is_scored_on_its_answer():
    think = "<think>\n2 objects: a large red circle on the left and a small blue square at the top right.\n</think>\n\n"
    assert score("vqa_spatial", think + "The answer is \\boxed{left}.", "left") == 1.0
    assert score("vqa_spatial", think + "The answer is \\boxed{right}.", "left") == 0.0
    assert score("vqa_spatial", think + "left", "left") == 1.0  # no box: what follows the trace
    assert score("grounding", think + "The answer is \\boxed{[100, 100, 400, 400]}.", "[100, 100, 400, 400]") == 1.0
    assert score("grounding", think + "The answer is \\boxed{[600, 600, 900, 900]}.", "[100, 100, 400, 400]") == 0.0
    # direct replies are scored as before; a trace that never closes scores nothing
    assert score("vqa_spatial", "left", "left") == 1.0
    assert score("vqa_spatial", "<think>\n2 objects: ... left", "left") == 0.0


@pytest.mark.parametrize("seed", range(8))
def test_chart_trace_reads_the_chart_then_looks_up_by_label(seed):
    """World(chart_trace="read"): the same chart and answer; the question asks for thinking; the trace reads every
    label with its value left to right, repeats each label the question names with its value (or the highest /
    lowest value's label with it), subtracts for a difference, and the boxed answer is the plain record's."""
    plain, traced = World(), World(chart_trace="read")
    (a, ims_a), (b, ims_b) = sample("chart", seed, world=plain), sample("chart", seed, world=traced)
    assert a["answer"] == b["answer"] and a["meta"] == b["meta"]
    assert [im.tobytes() for im in ims_a] == [im.tobytes() for im in ims_b]
    m = a["meta"]
    question = a["conversations"][0]["value"].removesuffix(plain.suffix)
    assert b["conversations"][0]["value"] == question + THINK_SUFFIX
    thinking, answer = parse_thinking(b["conversations"][1]["value"])
    assert answer == a["answer"]
    lines = thinking.split("\n")
    value = dict(zip(m["labels"], m["values"]))
    assert lines[0] == "From left to right: " + ", ".join(f"{k}={v}" for k, v in value.items()) + "."
    if m["question"] in ("max", "min"):  # the answer's label with its value, named by the trace's own word
        word = {"max": "Highest", "min": "Lowest"}[m["question"]]
        assert lines[1:] == [f"{word}: {a['answer']}={value[a['answer']]}."]
        assert value[a["answer"]] == (max if m["question"] == "max" else min)(m["values"])
    else:
        assert lines[1] == ", ".join(f"{k}={value[k]}" for k in m["args"]) + "."
        assert m["args"] == re.findall(r"\b([A-Z])\b", question)  # the labels the question names, in its order
    if m["question"] == "diff":
        x, y = (value[k] for k in m["args"])
        assert lines[2] == f"{x} - {y} = {x - y}." and str(x - y) == a["answer"]
    to_sample(b, ims_b)


def test_chart_trace_is_checked():
    with pytest.raises(ValueError, match="chart_trace"):
        World(chart_trace="caption")


@pytest.mark.parametrize("seed", range(12))
def test_text_recall_repeats_or_looks_up(seed):
    record, images = sample("text_recall", seed)
    assert images == [] and record["task"] == "text_recall"
    q, reply = record["conversations"][0]["value"], record["conversations"][1]["value"]
    assert reply == record["answer"]
    if record["meta"]["kind"] == "copy":
        run = q.removeprefix("Repeat exactly: ")
        assert run != q and reply == run and 6 <= len(run) <= 12 and set(run) <= set(RECALL_SYMBOLS)
    else:
        pairs, ask = q.split("\n")
        table = dict(p.split("=") for p in pairs.rstrip(".").split(", "))
        key = ask.removeprefix("What is the value of ").removesuffix("?")
        assert 3 <= len(table) <= 6 and reply == table[key]


def test_text_recall_draws_both_kinds():
    assert {sample("text_recall", s)[0]["meta"]["kind"] for s in range(12)} == {"copy", "lookup"}


def test_text_induction_draws_every_kind():
    assert {sample("text_induction", s)[0]["meta"]["kind"] for s in range(40)} == {"repeat", "lookup", "max", "min"}


@pytest.mark.parametrize("seed", range(12))
def test_text_induction_repeats_or_looks_up(seed):
    record, images = sample("text_induction", seed)
    assert images == [] and record["task"] == "text_induction" and "conversations" not in record
    prompt, completion = record["prompt"], record["completion"]
    assert completion == record["answer"]
    kind = record["meta"]["kind"]
    if kind == "repeat":
        assert prompt == completion + "." and 4 <= len(completion) <= 12 and set(completion) <= set(RECALL_SYMBOLS)
    elif kind in ("max", "min"):  # as chart_trace names a chart's highest / lowest value's label
        pairs, word = prompt.split(".\n")
        table = dict(p.split("=") for p in pairs.split(", "))
        label = (max if kind == "max" else min)(table, key=lambda k: int(table[k]))
        assert word == {"max": "Highest: ", "min": "Lowest: "}[kind] and completion == f"{label}={table[label]}"
        spec = {"labels": list(table), "values": [int(v) for v in table.values()]}
        assert chart_trace(spec, kind, [])[1] == word + completion + "."
    else:
        # laid out as chart_trace reads a chart: its first line, then a line naming labels up to the one asked
        pairs, asked = prompt.removesuffix("=").split(".\n")
        table = dict(p.split("=") for p in pairs.split(", "))
        assert len(table) == 3 and len(set(table.values())) == 3 and completion == table[asked.split(", ")[-1]]
        assert all(p.split("=")[1] == table[p.split("=")[0]] for p in asked.split(", ")[:-1])
        spec = {"labels": list(table), "values": [int(v) for v in table.values()]}
        assert chart_trace(spec, "value", [])[0] == "From left to right: " + pairs + "."


def test_text_induction_is_written_and_read_back_as_text(tmp_path, bpe_dir):
    """Its split holds prompt-completion lines (no turns, no images) that the JSONL source reads as text samples
    and the processor trains on the completion alone."""
    from sailvl.data.processor import IGNORE_INDEX, Processor
    from sailvl.data.sources import JsonlSource
    from sailvl.data.synth import generate_splits, to_sample
    from sailvl.data.tokenizer import load_tokenizer

    out = generate_splits(tmp_path, 4, 0, 0, seed=0, tasks=["vqa_color"],
                          extra_train={"induction": (20, ["text_induction"], World())})
    assert out["induction"]["images"] == 0
    lines = [json.loads(x) for x in (tmp_path / "induction.jsonl").read_text().splitlines()]
    assert {"repeat", "lookup"} <= {r["meta"]["kind"] for r in lines}
    assert all({"prompt", "completion"} <= set(r) and "conversations" not in r for r in lines)
    proc, src = Processor(load_tokenizer(bpe_dir)), JsonlSource(tmp_path / "induction.jsonl")
    for i, r in enumerate(lines):
        s = src.read(i)
        assert (s.prompt, s.text, s.messages) == (r["prompt"], r["completion"], [])
        enc = proc.encode_sample(s)
        assert proc.decode(enc["labels"][enc["labels"] != IGNORE_INDEX]) == r["completion"]
    record, images = sample("text_induction", 3)
    assert to_sample(record, images).prompt == record["prompt"]


def test_a_chart_drill_reads_the_chart_first_with_the_trace():
    """World(chart_trace="read"): a text drill about a chart opens with its reading (the trace's first line), then
    asks the same questions as without it; without the trace it does not read first."""
    from sailvl.data.synth.tasks_text import CHART_READ_QUESTION

    charts = 0
    for seed in range(40):
        (plain, ims_a), (traced, ims_b) = (sample("text_drill", seed, world=World(chart_trace=t))
                                           for t in ("none", "read"))
        assert [im.tobytes() for im in ims_a] == [im.tobytes() for im in ims_b]
        if plain["meta"]["image_kind"] != "chart":
            assert plain == traced
            continue
        charts += 1
        m, turns = traced["meta"], [c["value"] for c in traced["conversations"]]
        assert turns[0] == "<image>\n" + CHART_READ_QUESTION
        assert turns[1] == chart_trace({"labels": m["labels"], "values": m["values"]}, "value", [])[0]
        rest = [c["value"] for c in plain["conversations"]]
        assert turns[2:] == [rest[0].removeprefix("<image>\n"), *rest[1:]]
        assert CHART_READ_QUESTION not in " ".join(rest)
    assert charts >= 5
