"""The SAIL-VL2 chat template: exact strings, loss spans, thinking suffix and parser."""

import pytest

from sailvl.data.template import THINK_SUFFIX, Visuals, last_boxed, parse_thinking, render


def block(n):
    return "<img>" + "<IMG_CONTEXT>" * n + "</img>\n"


def test_single_image_with_system_prompt():
    msgs = [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A cat."}]
    text, spans = render(msgs, Visuals([3]), system="Be brief.")
    assert text == ("<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\n" + block(3) + "What is it?<|im_end|>"
                    "<|im_start|>assistant\nA cat.<|im_end|>")
    assert [text[s:e] for s, e in spans] == ["A cat.<|im_end|>"]


def test_multi_image_prefixes_and_generation_prompt():
    msgs = [{"role": "user", "content": "<image>\n<image>\nWhat changed?"}]
    text, spans = render(msgs, Visuals([2, 4]), add_generation_prompt=True)
    assert text == ("<|im_start|>user\nImage-1: " + block(2) + "Image-2: " + block(4) + "What changed?<|im_end|>"
                    "<|im_start|>assistant\n")
    assert spans == []
    # a placeholder not followed by a newline still yields one newline after the block
    text, _ = render([{"role": "user", "content": "<image>Describe."}], Visuals([1]))
    assert text == "<|im_start|>user\n" + block(1) + "Describe.<|im_end|>"


def test_video_frames_plain_and_with_timestamps():
    msgs = [{"role": "user", "content": "<video>\nWhere does it go?"}]
    text, _ = render(msgs, Visuals([], [2, 2]), add_generation_prompt=True)
    assert text == ("<|im_start|>user\nFrame-1: " + block(2) + "Frame-2: " + block(2) + "Where does it go?<|im_end|>"
                    "<|im_start|>assistant\n")
    text, _ = render(msgs, Visuals([], [1, 1], [0.0, 1.5]))
    assert "Frame-1 (0.0s): " + block(1) + "Frame-2 (1.5s): " + block(1) in text


def test_multi_turn_spans_and_think_fusion():
    msgs = [{"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>\n2 plus 2 is 4.\n</think>\n\n\\boxed{4}"},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "<think>\n\n</think>\n\n6"}]
    text, spans = render(msgs)
    assert text == ("<|im_start|>user\n2+2?" + THINK_SUFFIX + "<|im_end|>"
                    "<|im_start|>assistant\n<think>\n2 plus 2 is 4.\n</think>\n\n\\boxed{4}<|im_end|>"
                    "<|im_start|>user\nAnd 3+3?<|im_end|><|im_start|>assistant\n<think>\n\n</think>\n\n6<|im_end|>")
    # thinking sample: thinking + answer trained; direct sample: the empty think block is not trained
    assert [text[s:e] for s, e in spans] == ["<think>\n2 plus 2 is 4.\n</think>\n\n\\boxed{4}<|im_end|>",
                                             "6<|im_end|>"]


def test_thinking_suffix_is_not_doubled():
    msgs = [{"role": "user", "content": "Solve." + THINK_SUFFIX},
            {"role": "assistant", "content": "<think>ok</think>\\boxed{1}"}]
    assert render(msgs)[0].count(THINK_SUFFIX) == 1


def test_thinking_prompt_for_generation():
    text, _ = render([{"role": "user", "content": "Solve."}], thinking=True, add_generation_prompt=True)
    assert text == "<|im_start|>user\nSolve." + THINK_SUFFIX + "<|im_end|><|im_start|>assistant\n"
    text, _ = render([{"role": "user", "content": "Solve."}], thinking=False, add_generation_prompt=True)
    assert THINK_SUFFIX not in text


@pytest.mark.parametrize("out,expected", [
    ("<think>a then b</think>\n\nso \\boxed{12}", ("a then b", "12")),
    ("a then b</think> The answer is \\boxed{\\frac{1}{2}} or \\boxed{3}.", ("a then b", "3")),
    ("<think>x</think>\\boxed{\\frac{1}{2}}", ("x", "\\frac{1}{2}")),
    ("<think>x</think> plain answer ", ("x", "plain answer")),
    ("no thinking at all", (None, "no thinking at all")),
    ("\\boxed{5} only", (None, "5")),
])
def test_parse_thinking(out, expected):
    assert parse_thinking(out) == expected


def test_last_boxed_unbalanced():
    assert last_boxed("\\boxed{7} then \\boxed{unclosed") == "7"
    assert last_boxed("nothing") is None


def test_jinja_template_matches_render():
    jinja2 = pytest.importorskip("jinja2")
    from sailvl.data.template import JINJA_TEMPLATE

    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
            {"role": "user", "content": "Q2"}]
    got = jinja2.Template(JINJA_TEMPLATE).render(messages=msgs, add_generation_prompt=True)
    assert got == render(msgs, thinking=False, add_generation_prompt=True)[0]
