"""The synthetic world's training-only drills (several questions about one image, answers recomputed from the
spec), the answer-suffix knob and the training-only generators."""

import json
import re

import pytest

from sailvl.data.synth import World, generate_splits
from sailvl.data.synth.world import SHORT_ANSWER_SUFFIX

from .test_synth import _draws, _objs, _read, _rel, _the


def _scene_reply(text: str, scene) -> tuple[str, str | None]:
    """(kind, answer) of a drill question, the answer recomputed from the scene (None: a box, checked apart)."""
    rels = {"left of": "left", "right of": "right", "above": "above", "below": "below"}
    if m := re.fullmatch(r"What (colour|shape) is the (.+)\?", text):
        o = _the(scene, m.group(2))
        return m.group(1), o.colour if m.group(1) == "colour" else o.shape
    if text == "How many objects are there?":
        return "count", str(len(scene))
    if m := re.fullmatch(r"How many (\w+) objects are there\?", text):
        return "count", str(sum(o.colour == m.group(1) for o in scene))
    if m := re.fullmatch(r"How many (\w+) are there\?", text):
        return "count", str(sum(o.shape in (m.group(1)[:-1], m.group(1)[:-2]) for o in scene))
    if m := re.fullmatch(r"Is the (.+) left of, right of, above or below the (.+)\?", text):
        return "spatial", _rel(_the(scene, m.group(1)), _the(scene, m.group(2)))
    if m := re.fullmatch(r"Relative to the (.+), is the (.+) left, right, above or below\?", text):
        return "spatial", _rel(_the(scene, m.group(2)), _the(scene, m.group(1)))
    if m := re.fullmatch(r"Which is (bigger|smaller), the (.+) or the (.+)\?", text):
        a, b = _the(scene, m.group(2)), _the(scene, m.group(3))
        return "compare", m.group(2) if (a.r > b.r) == (m.group(1) == "bigger") else m.group(3)
    if m := re.fullmatch(r"Is there a (\w+) (\w+)\?", text):
        return "exists", "yes" if any((o.colour, o.shape) == (m.group(1), m.group(2)) for o in scene) else "no"
    if m := re.fullmatch(r"Is the (.+) (left of|right of|above|below) the (.+)\?", text):
        return "is_relation", "yes" if _rel(_the(scene, m.group(1)), _the(scene, m.group(3))) == rels[m.group(2)] else "no"
    if m := re.fullmatch(r"Is the (.+) (\w+)\?", text):
        return "is_colour", "yes" if _the(scene, m.group(1)).colour == m.group(2) else "no"
    assert text.startswith("Where is the "), text
    return "where", None


@pytest.mark.parametrize("subject", ["first", "last"])
def test_scene_drill_answers_recompute_from_the_scene(subject):
    world = World(answer_suffix=False, spatial_subject=subject)
    kinds = set()
    for record, images in _draws("scene_drill", 60, seed=3, world=world):
        conv, scene = record["conversations"], _objs(record["meta"]["scene"])
        assert 8 <= len(conv) <= 12 and len(images) == 1 and record["answer"] == conv[-1]["value"]
        assert conv[0]["value"].startswith("<image>\n") and all("<image>" not in t["value"] for t in conv[1:])
        questions = [q["value"].replace("<image>\n", "") for q in conv[0::2]]
        assert len(set(questions)) == len(questions) == len(record["meta"]["questions"])
        for text, a in zip(questions, conv[1::2]):
            kind, expect = _scene_reply(text, scene)
            kinds.add(kind)
            if expect is None:  # grounding: the box holds the object's centre (0-1000 coordinates)
                o = _the(scene, re.match(r"Where is the (.+)\? Answer", text).group(1))
                x1, y1, x2, y2 = json.loads(a["value"])
                assert x1 <= o.x * 1000 / 64 <= x2 and y1 <= o.y * 1000 / 64 <= y2
            else:
                assert a["value"] == expect, (text, a["value"], expect)
    assert len(kinds) == 9  # every kind of question shows up


def test_text_drill_answers_recompute_from_the_spec():
    world = World(answer_suffix=False, ocr_max_chars=2, table_max_value=9)
    seen = set()
    for record, images in _draws("text_drill", 60, seed=5, world=world):
        m, conv = record["meta"], record["conversations"]
        seen.add(m["image_kind"])
        qa = [(q["value"].replace("<image>\n", ""), a["value"]) for q, a in zip(conv[0::2], conv[1::2])]
        if m["image_kind"] == "chart":
            vals = dict(zip(m["labels"], m["values"]))
            asked = {re.fullmatch(r"What is the value of (\w)\?", q).group(1): a for q, a in qa if "value of" in q}
            assert asked == {k: str(v) for k, v in vals.items()} and len(qa) == len(vals) + 2
            for q, a in qa:
                if d := re.fullmatch(r"How much larger is (\w) than (\w)\?", q):
                    assert a == str(vals[d.group(1)] - vals[d.group(2)]) and int(a) > 0
                elif "highest" in q or "lowest" in q:
                    assert a == (max if "highest" in q else min)(vals, key=vals.get)
        elif m["image_kind"] == "table":
            assert len(qa) == len(m["rows"]) * len(m["cols"])
            for q, a in qa:
                r, c = re.fullmatch(r"What is the value in row (\w), column (\w)\?", q).groups()
                assert a == str(m["cells"][m["rows"].index(r)][m["cols"].index(c)])
        elif m["image_kind"] == "equation":
            assert dict(qa) == {"What is the answer to the problem in the image?": str(m["result"]),
                                "What is written in the image?": m["text"]}
        else:
            assert dict(qa) == {"What is written in the image?": m["text"], "What colour is the text?": m["colour"]}
    assert seen == {"text", "chart", "table", "equation"}


@pytest.mark.parametrize("items", [3, 4])
def test_chart_label_drill_names_each_label_by_its_place(items):
    """World(chart_label_drill=True): a chart's drill also asks for each label by its place (left / middle / right
    for three bars, "number i from the left" otherwise), answered with the label drawn there."""
    places = {3: ("on the left", "in the middle", "on the right")}
    world = World(answer_suffix=False, chart_label_drill=True, chart_items=items)
    n = 0
    for record, _ in _draws("text_drill", 40, seed=7, world=world):
        m, conv = record["meta"], record["conversations"]
        if m["image_kind"] != "chart":
            continue
        qa = [(q["value"].replace("<image>\n", ""), a["value"]) for q, a in zip(conv[0::2], conv[1::2])]
        named = {re.fullmatch(r"Which label is (.+)\?", q).group(1): a for q, a in qa if q.startswith("Which label is")}
        want = places.get(items) or tuple(f"number {i + 1} from the left" for i in range(items))
        assert named == dict(zip(want, m["labels"])) and len(qa) == 2 * items + 2
        n += 1
    assert n >= 5
    plain = [r for r, _ in _draws("text_drill", 40, seed=7, world=World(answer_suffix=False, chart_items=items))
             if r["meta"]["image_kind"] == "chart"]  # off by default
    assert plain and not any("Which label is" in t["value"] for r in plain for t in r["conversations"])


def test_answer_suffix_knob_and_training_only_generators(tmp_path):
    from sailvl.data.synth.registry import TRAIN_ONLY, check_tasks

    for task in ("vqa_color", "ocr", "chart", "scene_drill"):
        (plain, _), = _draws(task, 1, world=World(answer_suffix=False))
        (suffixed, _), = _draws(task, 1)
        assert plain["conversations"][0]["value"].endswith("?")
        assert suffixed["conversations"][0]["value"].endswith(SHORT_ANSWER_SUFFIX)
        assert plain["conversations"][0]["value"] + SHORT_ANSWER_SUFFIX == suffixed["conversations"][0]["value"]
    # drills are not evaluated tasks: not in the default task list, but accepted by name for training splits
    assert set(TRAIN_ONLY) == {"scene_drill", "text_drill", "text_lists", "text_recall", "text_induction"}
    assert not set(TRAIN_ONLY) & set(check_tasks(None))
    # text_lists: only text_instruct's open-ended kinds, the ones its test split holds
    from sailvl.data.synth.tasks_text import LIST_KINDS

    lists = [r for r, _ in _draws("text_lists", 60)]
    assert {r["task"] for r in lists} == {"text_instruct"} and {r["meta"]["kind"] for r in lists} == set(LIST_KINDS)
    # ... and a test split written after them never asks one of their questions (small kinds such as "larger",
    # 420 number pairs, are mostly covered by 3,000 of them)
    generate_splits(tmp_path / "lists", 10, 0, 300, seed=0, tasks=["text_instruct"],
                    extra_train={"lists": (3000, ["text_lists"], World())})
    asked = {r["conversations"][0]["value"] for r in _read(tmp_path / "lists", "lists")}
    test = [r["conversations"][0]["value"] for r in _read(tmp_path / "lists", "test")]
    assert len(test) == 300 and not asked & set(test)
    out = generate_splits(tmp_path, 12, 4, 4, seed=0, tasks=["vqa_color"],
                          extra_train={"drills": (6, ["scene_drill", "text_drill"], World())})
    assert out["drills"]["n"] == 6 and {r["task"] for r in _read(tmp_path, "drills")} == {"scene_drill", "text_drill"}
