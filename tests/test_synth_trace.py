"""World(scene_trace="caption"): scene questions answered through a describe-then-answer thinking trace, and the
evaluation scoring a thinking reply on its answer."""

import pytest

from sailvl.data.synth import TASKS, sample
from sailvl.data.synth.record import TRACE_TASKS, to_sample
from sailvl.data.synth.scene import Obj, caption
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
