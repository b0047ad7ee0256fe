"""The synthetic visual world: determinism, record validity, verifiable answers, disjoint splits, speed."""

import json
import random
import re
import time
from pathlib import Path

import pytest
from PIL import Image

from sailvl.data.schema import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from sailvl.data.synth import TASKS, World, generate, generate_splits, sample, to_sample
from sailvl.data.synth.world import COLOURS, SHORT_ANSWER_SUFFIX, THINK_SUFFIX

MEDIA_KEYS = ("image", "images", "video")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read(root: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (root / f"{split}.jsonl").read_text().splitlines()]


def _the(scene, ref: str):
    """The one object a referring phrase ("large red circle", "red object", "square") names."""
    words = [w for w in ref.split() if w != "object"]
    found = [o for o in scene if all(w in (o.size, o.colour, o.shape) for w in words)]
    assert len(found) == 1, (ref, scene)
    return found[0]


def _rel(a, b) -> str:
    dx, dy = a.x - b.x, a.y - b.y
    return ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("above" if dy < 0 else "below")


def _draws(task: str, n: int, seed: int = 0, world: World | None = None):
    rng = random.Random(seed)
    return [sample(task, rng, world=world) for _ in range(n)]


def _objs(scene):
    return [type("O", (), o) for o in scene]


# ---------------------------------------------------------------- files and determinism

def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    sa = generate(a, 54, seed=3)
    generate(b, 54, seed=3)
    generate(c, 54, seed=4)
    fa, fb = _files(a), _files(b)
    assert fa == fb and len(fa) > 54
    assert (a / "train.jsonl").read_bytes() != (c / "train.jsonl").read_bytes()
    assert sa["n"] == 54 and sum(sa["tasks"].values()) == 54 and set(sa["tasks"]) == set(TASKS)
    assert max(sa["tasks"].values()) - min(sa["tasks"].values()) <= 1  # round-robin shares
    assert sa["jsonl"] == str(a / "train.jsonl")


def test_written_records_are_valid(tmp_path):
    summary = generate(tmp_path, 72, seed=1, split="val")
    records = _read(tmp_path, "val")
    assert len(records) == 72 and summary["images"] == sum(
        len(r[k]) if isinstance(r.get(k), list) else (k in r) for r in records for k in MEDIA_KEYS)
    assert [r["id"] for r in records] == [f"val-{i:06d}" for i in range(72)]
    for r in records:
        conv = r["conversations"]
        assert len(conv) % 2 == 0 and (len(conv) == 2 or r["task"] == "scene_qa")  # scene_qa: several turns
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        human = conv[0]
        assert all(IMAGE_PLACEHOLDER not in t["value"] for t in conv[1:])
        assert isinstance(r["answer"], str) and r["answer"] and r["task"] in TASKS
        keys = [k for k in MEDIA_KEYS if k in r]
        assert len(keys) <= 1
        paths = [r["image"]] if "image" in r else r.get("images", r.get("video", []))
        for p in paths:
            assert p.startswith("images/val/") and not Path(p).is_absolute()
            with Image.open(tmp_path / p) as im:
                assert im.size == (64, 64) and im.mode == "RGB"
        if "video" in r:
            assert human["value"].count(VIDEO_PLACEHOLDER) == 1 and IMAGE_PLACEHOLDER not in human["value"]
            assert len(r["video"]) == World().video_frames
        else:
            assert human["value"].count(IMAGE_PLACEHOLDER) == len(paths)
            if "images" in r:
                assert len(paths) >= 2


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_makes_valid_samples(task):
    for record, images in _draws(task, 15, seed=hash(task) % 1000):
        assert record["task"] == task and record["answer"]
        json.dumps(record)  # JSON-able, meta included
        human = record["conversations"][0]["value"]
        n_img, n_vid = human.count(IMAGE_PLACEHOLDER), human.count(VIDEO_PLACEHOLDER)
        if task.startswith("video_"):
            assert n_vid == 1 and n_img == 0 and len(images) >= 2
        elif task == "multi_change":
            assert n_img == 2 == len(images) and human.startswith("<image>\n<image>\n")
        elif task == "text_instruct":
            assert n_img == n_vid == 0 and images == []
        else:
            assert n_img == 1 == len(images) and n_vid == 0
        assert all(im.size == (64, 64) and im.mode == "RGB" for im in images)
        s = to_sample(record, images)  # validates placeholders against images / video
        assert s.task == task and s.answer == record["answer"]


def test_scene_qa_asks_several_answerable_questions():
    """Every reply of a scene_qa conversation is recomputable from the scene in its meta."""
    from sailvl.data.synth.scene import Obj

    rng = random.Random(7)
    for _ in range(40):
        record, images = sample("scene_qa", rng)
        conv, scene = record["conversations"], [Obj(**o) for o in record["meta"]["scene"]]
        assert 4 <= len(conv) <= 8 and record["answer"] == conv[-1]["value"] and len(images) == 1
        for q, a in zip(conv[0::2], conv[1::2]):
            text, answer = q["value"].replace("<image>\n", "").split("\n")[0], a["value"]
            if text == "How many objects are there?":
                assert answer == str(len(scene))
            elif text.startswith("Is there a "):
                colour, shape = text[len("Is there a "):-1].split()
                assert answer == ("yes" if any((o.colour, o.shape) == (colour, shape) for o in scene) else "no")
            elif text.startswith("How many "):
                word = text.split()[2]
                n = sum(o.colour == word for o in scene) if text.endswith("objects are there?") else \
                    sum(o.shape + "s" == word or o.shape + "es" == word for o in scene)
                assert answer == str(n)
            elif text.startswith("What colour"):
                assert answer in {o.colour for o in scene}
            elif text.startswith("What shape"):
                assert answer in {o.shape for o in scene}
            else:
                assert text.startswith("Is the ") and answer in ("left", "right", "above", "below")


def test_text_only_tasks_have_no_image(tmp_path):
    generate(tmp_path, 20, seed=0, tasks=["text_instruct"])
    for r in _read(tmp_path, "train"):
        assert not any(k in r for k in MEDIA_KEYS)
        assert IMAGE_PLACEHOLDER not in r["conversations"][0]["value"]
        assert VIDEO_PLACEHOLDER not in r["conversations"][0]["value"]
    assert not any((tmp_path / "images" / "train").iterdir())


# ---------------------------------------------------------------- answers recomputed from the spec

def _centre_pixel_is(img, o):
    return img.getpixel((o.x, o.y)) == COLOURS[o.colour]


def test_count_answers():
    for record, (img,) in _draws("vqa_count", 60):
        scene, flt = _objs(record["meta"]["scene"]), record["meta"]["count_filter"]
        n = sum(all(getattr(o, k) == v for k, v in flt.items()) for o in scene)
        assert record["answer"] == str(n)
        assert all(_centre_pixel_is(img, o) for o in scene)


def test_colour_answers_and_unique_reference():
    for record, (img,) in _draws("vqa_color", 60):
        scene = _objs(record["meta"]["scene"])
        target = scene[record["meta"]["target"]]
        ref = re.match(r"<image>\nWhat colour is the (.+)\?", record["conversations"][0]["value"]).group(1)
        matches = [o for o in scene if all(w in (o.size, o.shape) for w in ref.split())]
        assert matches == [target] and record["answer"] == target.colour
        assert _centre_pixel_is(img, target)


def test_spatial_and_compare_answers():
    for record, _ in _draws("vqa_spatial", 40):
        m = record["meta"]
        a, b = _objs([m["scene"][m["a"]], m["scene"][m["b"]]])
        assert record["answer"] == _rel(a, b)
    for record, _ in _draws("vqa_compare", 40):
        m = record["meta"]
        a, b = _objs([m["scene"][m["a"]], m["scene"][m["b"]]])
        bigger_is_a = a.r > b.r
        winner = m["a"] if bigger_is_a == (m["word"] == "bigger") else m["b"]
        assert winner == m["winner"] and record["answer"].split()[-1] in (m["scene"][winner]["shape"], "object")


def test_arithmetic_answers_and_thinking_format():
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    for task in ("math_cot", "math_direct"):
        for record, _ in _draws(task, 40):
            m = record["meta"]
            assert 0 <= m["a"] <= 9 and 0 <= m["b"] <= 9  # single digit by default
            assert record["answer"] == str(ops[m["op"]](m["a"], m["b"]))
            reply = record["conversations"][1]["value"]
            if task == "math_cot":
                assert record["conversations"][0]["value"].endswith(THINK_SUFFIX)
                assert re.fullmatch(r"<think>\n.+\n</think>\n\nThe answer is \\boxed\{(\d+)\}\.", reply, re.DOTALL)
                assert reply.rsplit("\\boxed{", 1)[1].split("}")[0] == record["answer"]
            else:
                assert reply == record["answer"]
                assert record["conversations"][0]["value"].endswith(SHORT_ANSWER_SUFFIX)


def test_math_trace_styles():
    """"steps" counts one number at a time between the problem and the result; "short" has just those two lines;
    both end in the boxed answer, and an unknown style is refused."""
    rng = random.Random(0)
    for style, n_lines in (("steps", 3), ("short", 2)):
        world = World(math_trace=style, max_operand=5)
        for _ in range(30):
            record, _ = sample("math_cot", rng, world=world)
            m = record["meta"]
            think = record["conversations"][1]["value"].split("<think>\n", 1)[1].split("\n</think>", 1)[0]
            lines = think.split("\n")
            assert lines[0] == f"The image shows {m['a']} + {m['b']}."
            assert lines[-1] == f"So {m['a']} + {m['b']} = {record['answer']}."
            assert len(lines) == n_lines
    with pytest.raises(ValueError, match="math_trace"):
        World(math_trace="long")


def test_image_position_last_puts_the_media_after_the_question(tmp_path):
    """"last" moves the placeholders heading the first user turn behind its question (before a trailing thinking
    instruction) and changes nothing else: same answers, images, later turns; written files follow it."""
    last = World(image_position="last")
    for task in sorted(TASKS):
        (a, ims_a), (b, ims_b) = sample(task, 5, world=World()), sample(task, 5, world=last)
        assert a["answer"] == b["answer"] and a["conversations"][1:] == b["conversations"][1:]
        assert [im.tobytes() for im in ims_a] == [im.tobytes() for im in ims_b]
        first, moved = a["conversations"][0]["value"], b["conversations"][0]["value"]
        head = "".join(ph + "\n" for ph in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER) for _ in range(first.count(ph)))
        if not head:
            assert moved == first
            continue
        assert first.startswith(head)
        body = first[len(head):]
        tail = THINK_SUFFIX if body.endswith(THINK_SUFFIX) else ""
        assert (tail != "") == (task == "math_cot")
        assert moved == body[:len(body) - len(tail)] + "\n" + head[:-1] + tail
        to_sample(b, ims_b)  # still a valid sample: one placeholder per image
    generate(tmp_path, 24, seed=2, split="val", world=last)
    for r in _read(tmp_path, "val"):
        human = r["conversations"][0]["value"]
        if IMAGE_PLACEHOLDER in human or VIDEO_PLACEHOLDER in human:
            assert not human.startswith(("<image>", "<video>"))
    with pytest.raises(ValueError, match="image_position"):
        World(image_position="middle")


def test_grounding_box_contains_the_object():
    for record, (img,) in _draws("grounding", 60):
        m = record["meta"]
        o = _objs([m["scene"][m["target"]]])[0]
        x1, y1, x2, y2 = json.loads(record["answer"])
        assert record["answer"] == f"[{x1}, {y1}, {x2}, {y2}]"
        assert all(0 <= v <= 1000 for v in (x1, y1, x2, y2)) and x1 < x2 and y1 < y2
        cx, cy = (o.x + 0.5) * 1000 / 64, (o.y + 0.5) * 1000 / 64
        assert x1 <= cx <= x2 and y1 <= cy <= y2
        assert (x2 - x1) == pytest.approx((2 * o.r + 1) * 1000 / 64, abs=1)
        assert _centre_pixel_is(img, o)


def test_chart_table_ocr_caption_answers():
    for record, _ in _draws("chart", 40):
        m = record["meta"]
        vals, args = dict(zip(m["labels"], m["values"])), m["args"]
        if m["question"] == "value":
            expect = str(vals[args[0]])
        elif m["question"] == "diff":
            expect = str(vals[args[0]] - vals[args[1]])
        else:
            expect = (max if m["question"] == "max" else min)(vals, key=vals.get)
        assert record["answer"] == expect
    for record, _ in _draws("table", 20):
        m = record["meta"]
        assert record["answer"] == str(m["cells"][m["rows"].index(m["row"])][m["cols"].index(m["col"])])
    for record, _ in _draws("ocr", 30):
        assert record["answer"] == record["meta"]["text"] and 1 <= len(record["answer"]) <= 3
    for record, _ in _draws("caption", 30):
        scene = record["meta"]["scene"]
        cap = record["answer"]
        assert cap.startswith(f"{len(scene)} object") and cap == record["conversations"][1]["value"]
        for o in scene:
            assert f"{o['size']} {o['colour']} {o['shape']}" in cap


def test_multi_image_and_video_answers():
    for record, (before, after) in _draws("multi_change", 30):
        m = record["meta"]
        kb = {(o["colour"], o["shape"]) for o in m["before"]}
        ka = {(o["colour"], o["shape"]) for o in m["after"]}
        if m["change"] == "added":
            (c, s), = ka - kb
            assert record["answer"] == f"a {c} {s} was added" and not kb - ka
        elif m["change"] == "removed":
            (c, s), = kb - ka
            assert record["answer"] == f"the {c} {s} was removed" and not ka - kb
        else:
            (c, s), = kb - ka
            (c2, s2), = ka - kb
            assert s == s2 and record["answer"] == f"the {c} {s} turned {c2}"
        assert before.tobytes() != after.tobytes()
    for record, frames in _draws("video_motion", 30):
        tracks = {}
        for fr in record["meta"]["frames"]:
            for o in fr:
                tracks.setdefault((o["colour"], o["shape"]), []).append((o["x"], o["y"]))
        moving = [t for t in tracks.values() if len(set(t)) > 1]
        assert len(moving) == 1
        (x0, y0), (x1, y1) = moving[0][0], moving[0][-1]
        expect = ("left" if x1 < x0 else "right") if x0 != x1 else ("up" if y1 < y0 else "down")
        assert record["answer"] == expect and len(frames) == len(record["meta"]["frames"])
    for record, frames in _draws("video_count", 30):
        seen = {(o["colour"], o["shape"]) for fr in record["meta"]["frames"] for o in fr}
        assert record["answer"] == str(len(seen))


# ---------------------------------------------------------------- splits

def _content_keys(root: Path, split: str) -> set:
    keys = set()
    for r in _read(root, split):
        paths = [r["image"]] if "image" in r else r.get("images", r.get("video", []))
        pixels = tuple(Image.open(root / p).tobytes() for p in paths)
        keys.add((r["task"], r["conversations"][0]["value"], r["answer"], pixels))
    return keys


def test_splits_are_disjoint(tmp_path):
    # text_instruct has a small content space, so val / test must redraw duplicates of train
    res = generate_splits(tmp_path, 400, 80, 80, seed=0, tasks=["text_instruct", "text_instruct", "math_direct"])
    assert {k: v["n"] for k, v in res.items()} == {"train": 400, "val": 80, "test": 80}
    assert res["val"]["redrawn"] + res["test"]["redrawn"] > 0
    tr, va, te = (_content_keys(tmp_path, s) for s in ("train", "val", "test"))
    assert not tr & va and not tr & te and not va & te
    manifest = json.loads((tmp_path / "synth.json").read_text())
    assert manifest["seed"] == 0 and manifest["world"]["image_size"] == 64
    # each split has its own RNG: the same call for one split alone reproduces train exactly
    other = tmp_path / "alone"
    generate(other, 400, seed=0, split="train", tasks=["text_instruct", "text_instruct", "math_direct"])
    assert (other / "train.jsonl").read_bytes() == (tmp_path / "train.jsonl").read_bytes()


def test_extra_training_splits_join_the_disjointness(tmp_path):
    """An extra training split of another world (a curriculum) is written after train; val / test avoid it."""
    easy = World(max_objects=1, ocr_max_chars=1)
    res = generate_splits(tmp_path, 50, 200, 200, seed=0, tasks=["ocr"],
                          extra_train={"basics": (300, ["ocr"], easy)})
    assert {k: v["n"] for k, v in res.items()} == {"train": 50, "basics": 300, "val": 200, "test": 200}
    basics = [json.loads(x) for x in (tmp_path / "basics.jsonl").read_text().splitlines()]
    assert all(len(r["answer"]) == 1 for r in basics)  # the easy world's one-character OCR
    ba, va, te = (_content_keys(tmp_path, s) for s in ("basics", "val", "test"))
    assert not ba & va and not ba & te
    assert json.loads((tmp_path / "synth.json").read_text())["extra_train"]["basics"]["world"]["max_objects"] == 1
    with pytest.raises(ValueError, match="overwrite"):
        generate_splits(tmp_path, 1, 1, 1, extra_train={"test": (1, ["ocr"], easy)})



def test_chunks_drawn_by_workers_give_the_same_bytes(tmp_path, monkeypatch, capsys):
    """A split larger than a chunk is drawn chunk by chunk, each from its own RNG: 1 or 2 worker processes write the
    same files, and val / test still avoid every chunk's content."""
    from sailvl.data.synth import writer

    tasks = ["text_instruct", "math_direct", "vqa_color"]
    monkeypatch.setattr(writer, "CHUNK", 40)
    res = {w: generate_splits(tmp_path / f"w{w}", 130, 30, 30, seed=1, tasks=tasks, workers=w, progress=w == 2)
           for w in (1, 2)}
    assert _files(tmp_path / "w1") == _files(tmp_path / "w2")
    lines = capsys.readouterr().err.splitlines()  # the progress line, per chunk or tenth, ends at every sample
    assert lines[0].startswith("synth 40/190 | split train") and lines[-1].startswith("synth 190/190 | split test")
    assert res[1]["train"]["tasks"] == res[2]["train"]["tasks"] and sum(res[1]["train"]["tasks"].values()) == 130
    train = _read(tmp_path / "w1", "train")
    assert [r["id"] for r in train] == [f"train-{i:06d}" for i in range(130)]
    pngs = [(tmp_path / "w1" / r["image"]).read_bytes() for r in train if r["task"] == "vqa_color"]
    assert len(set(pngs)) == len(pngs) > 40  # chunks 1-3 are not chunk 0's draws again
    tr, va, te = (_content_keys(tmp_path / "w1", s) for s in ("train", "val", "test"))
    assert not tr & va and not tr & te and not va & te
    with pytest.raises(ValueError, match="workers"):
        generate(tmp_path / "bad", 100, workers=0)


# ---------------------------------------------------------------- dial, errors, speed

def test_bigger_world():
    world = World(image_size=128, max_objects=5, shapes=("circle", "square", "triangle", "diamond", "cross"),
                  small_radius=(6, 8), large_radius=(10, 12),
                  ocr_max_chars=6, math_ops=("+", "-", "*"), max_operand=20, video_frames=6,
                  chart_items=5, table_shape=(3, 3))
    for task in TASKS:
        for record, images in _draws(task, 5, world=world):
            assert all(im.size == (128, 128) for im in images)
            to_sample(record, images)
    assert sample("caption", 0, image_size=96)[1][0].size == (96, 96)


def test_chart_font():
    """World.chart_font sets the chart's label / value text size: bigger letters under the axis, same content."""
    import numpy as np
    from sailvl.data.synth.render import chart_axis, make_chart

    heights = {}
    for fs in (11, 16):
        world = World(chart_font=fs)
        spec, img = make_chart(random.Random(3), world, kind="bar")
        axis_y = chart_axis(world, world.px(fs))[0]
        ink = (np.asarray(img)[axis_y + 1:] < 100).all(-1).any(1)  # black label pixels per row below the axis
        heights[fs] = int(ink.sum())
        assert spec["labels"] == make_chart(random.Random(3), World(), kind="bar")[0]["labels"]
    assert heights[16] >= heights[11] + 3, heights
    with pytest.raises(ValueError, match="chart_font"):
        World(chart_font=30)


def test_chart_letters():
    """World.chart_letters: labels are a sorted sample of those letters (left to right); None keeps any A-Z in any
    order; bad sets are refused."""
    from sailvl.data.synth.render import make_chart

    seen = set()
    for i in range(40):
        spec = make_chart(random.Random(i), World(chart_letters="ABCDEF"))[0]
        assert spec["labels"] == sorted(spec["labels"]) and set(spec["labels"]) <= set("ABCDEF")
        assert len(set(spec["labels"])) == 3
        seen.update(spec["labels"])
    assert seen == set("ABCDEF")
    anywhere = [make_chart(random.Random(i), World())[0]["labels"] for i in range(40)]
    assert any(lab != sorted(lab) for lab in anywhere) and len({c for lab in anywhere for c in lab}) > 6
    for bad in ("AB", "AAB", "abc", "AB1"):
        with pytest.raises(ValueError, match="chart_letters"):
            World(chart_letters=bad)


def test_spatial_max_objects():
    """World.spatial_max_objects bounds the scenes spatial-relation questions are asked about (vqa_spatial, vqa_yesno's
    relation questions, the drills' and scene_qa's) and no other question's; None means max_objects; out-of-range
    values are refused."""
    def sizes(task, world, n=60, keep=lambda r: True):
        return {len(r["meta"]["scene"]) for r, _ in _draws(task, n, world=world) if keep(r)}

    def relational(r):  # a drill / scene_qa record with a spatial-relation question
        return any(" left of" in q or " right of" in q or " above" in q or " below" in q
                   for q in r["meta"]["questions"])

    two = World(spatial_max_objects=2)
    assert sizes("vqa_spatial", two) == {2} and sizes("vqa_spatial", World()) == {2, 3}
    relation = lambda r: r["meta"]["kind"] == "relation"  # noqa: E731
    assert sizes("vqa_yesno", two, 150, relation) == {2} and sizes("vqa_yesno", World(), 150, relation) == {2, 3}
    for task in ("scene_drill", "scene_qa"):
        assert sizes(task, two, 150, relational) == {2} and sizes(task, World(), 150, relational) == {2, 3}
        assert sizes(task, two, 150) == {1, 2, 3}
    assert sizes("vqa_compare", two) == {2, 3} and sizes("vqa_color", two) == {1, 2, 3}
    for record, _ in _draws("vqa_spatial", 20, world=two):  # still the relation of the first named to the second
        m = record["meta"]
        a, b = _objs([m["scene"][m["a"]], m["scene"][m["b"]]])
        assert record["answer"] == _rel(a, b)
    for bad in (1, 4):
        with pytest.raises(ValueError, match="spatial_max_objects"):
            World(spatial_max_objects=bad)


def test_spatial_subject():
    """World.spatial_subject names the asked-about object first or last; the answer is its place relative to the
    other one either way."""
    for subject, pattern in (("first", r"<image>\nIs the (?P<a>.+) left of, right of, above or below the (?P<b>.+)\?"),
                             ("last", r"<image>\nRelative to the (?P<b>.+), is the (?P<a>.+) left, right, above or "
                                      r"below\?")):
        for record, _ in _draws("vqa_spatial", 30, world=World(spatial_subject=subject, answer_suffix=False)):
            m, q = record["meta"], re.fullmatch(pattern, record["conversations"][0]["value"])
            scene = _objs(m["scene"])
            a, b = scene[m["a"]], scene[m["b"]]
            assert (_the(scene, q["a"]), _the(scene, q["b"])) == (a, b)  # each phrase names its object
            assert record["answer"] == _rel(a, b)
    with pytest.raises(ValueError, match="spatial_subject"):
        World(spatial_subject="middle")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        generate(tmp_path, 5, tasks=["vqa_colour_typo"])
    with pytest.raises(ValueError, match="unknown task"):
        sample("nope", random.Random(0))
    with pytest.raises(ValueError, match="n must be"):
        generate(tmp_path, -1)
    with pytest.raises(ValueError, match="n_val"):
        generate_splits(tmp_path, 5, -2, 5)
    with pytest.raises(ValueError, match="split"):
        generate(tmp_path, 1, split="../evil")
    with pytest.raises(ValueError):
        World(colours=("red", "mauve"))
    with pytest.raises(ValueError):
        World(max_objects=0)
    with pytest.raises(ValueError, match="contradicts"):
        sample("caption", 0, image_size=128, world=World(image_size=96))
    assert generate(tmp_path, 0)["n"] == 0 and (tmp_path / "train.jsonl").read_text() == ""


def test_rng_kinds_agree():
    import numpy as np
    a = sample("vqa_color", 7)[0]
    b = sample("vqa_color", random.Random(7))[0]
    assert a == b
    c1 = sample("ocr", np.random.default_rng(5))[0]
    c2 = sample("ocr", np.random.default_rng(5))[0]
    assert c1 == c2


def test_generation_rate(tmp_path):
    generate(tmp_path / "warm", 18, seed=0)  # font loading and imports out of the timing
    n = 900
    t0 = time.perf_counter()
    generate(tmp_path / "rate", n, seed=0)
    rate = n / (time.perf_counter() - t0)
    assert rate > 500, f"{rate:.0f} samples/s"


def test_every_rendered_character_exists_in_the_font():
    from sailvl.data.synth.render import DIGITS, LETTERS, OP_GLYPH
    from sailvl.data.synth.world import font
    f = font(20)

    def ink(ch):
        m = f.getmask(ch)
        return m.size, bytes(m)

    missing = ink("\u2603")  # a glyph the bundled font lacks: its "notdef" box
    for ch in LETTERS + DIGITS + "=?" + "".join(OP_GLYPH.values()):
        assert ink(ch) != missing, ch  # (the bundled font has no "\u00d7": multiplication is drawn "x")
