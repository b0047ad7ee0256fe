"""VLMEvalKit TSV reading (pointer rows, multi-image rows, options, categories, huge fields), task resolution
and prompt building."""

import base64
import csv
import io

import numpy as np
import pytest
from PIL import Image

from sailvl.data.template import CHOICE_SUFFIX, SHORT_ANSWER_SUFFIX, THINK_SUFFIX
from sailvl.eval.items import EvalItem, read_jsonl_items
from sailvl.eval.tasks import build_prompt, load_items, parse_answer, resolve_tasks
from sailvl.eval.tsv import read_vlmeval_tsv


def png(color=(255, 0, 0), size=(8, 8), noise=False) -> bytes:
    if noise:
        im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8))
    else:
        im = Image.new("RGB", size, color)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def write_tsv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:  # quoted the way pandas.to_csv writes TSVs
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


HEADER = ["index", "image", "question", "hint", "A", "B", "C", "answer", "category", "l2-category"]


@pytest.fixture
def tsv(tmp_path):
    red, blue, big = png((255, 0, 0)), png((0, 0, 255)), png(size=(300, 300), noise=True)
    rows = [
        ["10", b64(red), "Which colour?", "Look closely.", "red", "blue", "green", "A", "colour", "perception"],
        ["11", "10", "Is it dark?", "", "yes", "no", "", "B", "colour", "reasoning"],  # a pointer to row 10
        ["12", str([b64(red), b64(blue)]), "Compare\tthe two\nimages.", "", "same", "different", "", "B", "multi", ""],
        ["13", "", "No image here", "", "a", "b", "", "A", "colour", ""],  # skipped, as VLMEvalKit does
        ["14", b64(big), "Big?", "", "yes", "no", "", "A", "size", ""],
    ]
    path = tmp_path / "MyBench.tsv"
    write_tsv(path, HEADER, rows)
    return path, red, blue, big


def test_tsv_reader_resolves_pointers_lists_options_and_huge_fields(tsv):
    path, red, blue, big = tsv
    assert len(b64(big)) > 131072  # larger than csv's default field limit
    items, skipped = read_vlmeval_tsv(path)
    assert [it.id for it in items] == ["10", "11", "12", "14"]
    assert skipped == [{"id": "13", "reason": "no image"}]
    by = {it.id: it for it in items}
    assert by["10"].images == [red] and by["11"].images == [red]
    assert by["12"].images == [red, blue]
    assert by["12"].question == "Compare\tthe two\nimages."
    assert by["14"].images == [big]
    assert by["10"].options == {"A": "red", "B": "blue", "C": "green"} and by["11"].options == {"A": "yes", "B": "no"}
    assert by["10"].hint == "Look closely." and by["11"].hint is None
    assert by["10"].category == "colour" and by["10"].meta == {"l2-category": "perception"}
    assert by["10"].answers == ["A"]


def test_tsv_answer_lists_and_image_paths(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png())
    path = tmp_path / "TextVQA_VAL.tsv"
    write_tsv(path, ["index", "image_path", "question", "answer", "split"],
              [["0", "img/a.png", "What?", str(["stop", "stop sign"]), "val"],
               ["1", "img/missing.png", "What?", "x", "val"]])
    items, skipped = read_vlmeval_tsv(path)
    assert items[0].answers == ["stop", "stop sign"] and items[0].category == "val"
    assert items[0].images == [str(tmp_path / "img" / "a.png")]
    assert skipped[0]["id"] == "1" and "missing image file" in skipped[0]["reason"]


@pytest.mark.parametrize("rows, header, message", [
    ([["1", "99", "q", "A"]], ["index", "image", "question", "answer"], "row index '99', which does not exist"),
    ([["1", "2", "q", "A"], ["2", "1", "q", "A"]], ["index", "image", "question", "answer"], "loop"),
    ([["1", "x" * 100, "q"]], ["index", "image", "question"], "no 'answer' column"),
    ([["1", "x" * 100, "A"]], ["index", "image", "answer"], "no 'question' column"),
    ([["1", "x" * 100, "q", "A", "extra"]], ["index", "image", "question", "answer"], "line 2: 5 fields"),
    ([["1", "q", "A"], ["1", "q", "B"]], ["index", "question", "answer"], "duplicate item id '1'"),
])
def test_bad_tsv_files_are_clear_errors(tmp_path, rows, header, message):
    path = tmp_path / "bad.tsv"
    write_tsv(path, header, rows)
    with pytest.raises(ValueError, match=message):
        read_vlmeval_tsv(path)


def test_known_names_map_to_their_metric_and_prompt(tmp_path, monkeypatch):
    header = ["index", "image", "question", "answer"]
    for name in ("OCRBench", "ChartQA_TEST", "DocVQA_VAL", "TextVQA_VAL"):
        write_tsv(tmp_path / f"{name}.tsv", header, [["1", b64(png()), "q", "a"]])
    write_tsv(tmp_path / "MMStar.tsv", header + ["A", "B"], [["1", b64(png()), "q", "A", "x", "y"]])
    monkeypatch.setenv("LMUData", str(tmp_path))
    expect = {"MMStar": ("choice", "choice"), "OCRBench": ("text", "ocrbench"),
              "ChartQA_TEST": ("text", "relaxed_accuracy"), "DocVQA_VAL": ("text", "anls"),
              "TextVQA_VAL": ("text", "vqa_accuracy")}
    for name, (parser, metric) in expect.items():
        (spec,) = resolve_tasks(name)
        assert (spec.parser, spec.metric, spec.data) == (parser, metric, str(tmp_path / f"{name}.tsv"))
    (spec,) = resolve_tasks(str(tmp_path / "MMStar.tsv"))
    assert spec.metric == "choice" and spec.prompt.endswith(CHOICE_SUFFIX)
    write_tsv(tmp_path / "Other.tsv", header + ["A", "B"], [["1", b64(png()), "q", "A", "x", "y"]])
    assert resolve_tasks(str(tmp_path / "Other.tsv"))[0].metric == "choice"  # option columns -> multiple choice
    assert resolve_tasks(str(tmp_path / "DocVQA_VAL.tsv"), metric="accuracy")[0].metric == "accuracy"


def test_unknown_task_names_suggest(tmp_path):
    with pytest.raises(ValueError, match="did you mean 'MMStar'"):
        resolve_tasks("MMstar")
    with pytest.raises(ValueError, match="unknown synthetic ability"):
        resolve_tasks("synth/vqa_colour")
    with pytest.raises(FileNotFoundError, match="pass --data"):
        resolve_tasks("OCRBench", data=str(tmp_path / "nope.tsv"))


def test_prompts_and_thinking_answers():
    (mcq,) = resolve_tasks("synth/vqa_color")  # any spec; prompts below use explicit templates
    item = EvalItem(id="1", question="Which {colour}?", answers=["B"], images=[b"x"], options={"A": "red", "B": "blue"},
                    hint="Look.")
    mcq.prompt, mcq.parser, mcq.metric = "{hint}{question}{options}" + CHOICE_SUFFIX, "choice", "choice"
    assert build_prompt(mcq, item) == "<image>\nLook.\nWhich {colour}?\nA. red\nB. blue" + CHOICE_SUFFIX
    assert build_prompt(mcq, item, think=True).endswith(CHOICE_SUFFIX + THINK_SUFFIX)
    assert parse_answer(mcq, "<think>It is blue, so B.</think> The answer is \\boxed{B}", item, think=True) == "B"
    assert parse_answer(mcq, "<think>hmm</think>", item, think=True) is None
    # a reply that thinks without being asked is read the same way
    assert parse_answer(mcq, "<think>Not A: it is blue.</think> The answer is \\boxed{B}", item, think=False) == "B"
    placed = EvalItem(id="2", question="<image>\nWhat?", answers=["x"], images=[b"x"])
    short = resolve_tasks("synth/vqa_color")[0]
    short.prompt = "{question}" + SHORT_ANSWER_SUFFIX
    assert build_prompt(short, placed) == "<image>\nWhat?" + SHORT_ANSWER_SUFFIX  # placeholders not repeated


def test_jsonl_questions_circular_and_limit(tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    lines = [('{"id": "q1", "question": "Colour?", "image": "a.png", "answer": "B", "options": {"A": "red", "B": "blue", '
              '"C": "green"}, "category": "c1"}'),
             ('{"id": "q2", "question": "Shape?", "image": "data:image/png;base64,' + b64(png()) + '", "answer": "A", '
              '"options": {"A": "circle", "B": "square"}}'),
             'not json', '{"id": "q3", "question": "Where?", "image": "missing.png", "answer": "A"}', '']
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(lines))
    items, skipped = read_jsonl_items(path)
    assert [it.id for it in items] == ["q1", "q2"] and items[1].images[0] == png()
    assert [s["id"] for s in skipped] == ["line 3", "line 4"] and "missing image" in skipped[1]["reason"]
    (spec,) = resolve_tasks(str(path))
    assert spec.metric == "choice"
    spec.circular = True
    expanded, _ = load_items(spec)
    assert [it.id for it in expanded] == ["q1@0", "q1@1", "q1@2", "q2@0", "q2@1"]
    assert expanded[1].options == {"A": "green", "B": "red", "C": "blue"} and expanded[1].answers == ["C"]
    assert [it.id for it in load_items(spec, limit=1)[0]] == ["q1@0", "q1@1", "q1@2"]


def test_jsonl_conversation_records_skip_plain_text_ones(tmp_path):
    """A conversation-record question file may hold plain-text (training) records: they ask nothing and are skipped
    with a reason, not an error."""
    lines = ['{"id": "c1", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]}',
             '{"id": "t1", "prompt": "K:1.K=", "completion": "1"}']
    path = tmp_path / "recs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    items, skipped = read_jsonl_items(path)
    assert [(it.id, it.question, it.answers) for it in items] == [("c1", "Say hi.", ["hi"])]
    assert skipped == [{"id": "line 2", "reason": "no question (no user turn)"}]
