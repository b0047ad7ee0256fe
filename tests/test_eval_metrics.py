"""Each metric on a table of hand-checked cases, including the reference toolkits' quirks."""

import pytest

from sailvl.eval.metrics import (
    OCRBENCH_HME,
    accuracy,
    anls,
    circular_hit,
    circular_variants,
    extract_boxed,
    extract_choice,
    grounding_hit,
    grounding_iou,
    numeric_match,
    ocrbench_hit,
    relaxed_accuracy,
    vqa_accuracy,
    vqa_normalize,
)

TEN = 10


@pytest.mark.parametrize("pred, answers, expected", [
    ("2", ["2"] * TEN, 1.0),
    ("two", ["2"] * TEN, 1.0),                           # number words -> digits
    ("2", ["2"] * 3 + ["3"] * 7, 0.9),                   # 3 matches: (3 * 2/3 + 7 * 1) / 10
    ("2", ["2"] * 2 + ["x"] * 8, 0.6),                   # (2 * 1/3 + 8 * 2/3) / 10
    ("2", ["2"] + ["x"] * 9, 0.3),                       # (1 * 0 + 9 * 1/3) / 10
    ("2", ["x"] * TEN, 0.0),
    ("The Cat.", ["cat"] * TEN, 1.0),                    # case, trailing period, article
    ("dont", ["don't"] * TEN, 1.0),                      # contractions restored
    ("1,000", ["1000"] * TEN, 1.0),                      # digit,digit comma: punctuation deleted
    ("t-shirt", ["t shirt"] * TEN, 1.0),                 # a hyphen not touching a space becomes a space
    ("t-shirt", ["tshirt"] * TEN, 0.0),
    ("red - blue", ["red blue"] * TEN, 1.0),             # touching a space: deleted
    ("none", ["0"] * TEN, 1.0),                          # the official map sends "none" to 0
    ("3.5", ["35"] * TEN, 0.0),                          # a period before a digit stays
    ("3.", ["3"] * TEN, 1.0),
    ("yes\n", ["Yes"], 0.0),                             # one answer: leaving it out leaves no match
])
def test_vqa_accuracy(pred, answers, expected):
    assert vqa_accuracy(pred, answers) == pytest.approx(expected, abs=1e-12)


def test_vqa_normalize_details():
    assert vqa_normalize("  an apple?\tyes ") == "apple yes"
    assert vqa_normalize("couldnt've") == "couldn't've"
    assert vqa_normalize("." * 40) == "." * 8  # the reference removes at most 32 periods


@pytest.mark.parametrize("pred, answers, expected", [
    ("Hello World", ["hello world"], 1.0),
    ("New  York", ["new york"], 1.0),                    # whitespace collapsed for the distance
    ("  abc  ", ["abd"], 1 - 1 / 7),                     # quirk: divided by the raw length 7, not 3
    ("abcd", ["abef"], 0.5),                             # similarity exactly 0.5 is kept
    ("abcd", ["axyz"], 0.0),                             # 0.25 < 0.5 -> 0
    ("kitten", ["sitting", "kitten!"], 1 - 1 / 7),       # best answer
    ("", [""], 1.0),
])
def test_anls(pred, answers, expected):
    assert anls(pred, answers) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("pred, answers, expected", [
    ("5%", ["0.05"], 1.0),                                # percent signs become fractions
    ("104", ["100"], 1.0),
    ("105", ["100"], 1.0),                                # exactly 5% passes
    ("106", ["100"], 0.0),
    ("0.0", ["0"], 0.0),                                  # quirk: a target of 0 takes the string path
    ("0", ["0"], 1.0),
    (" Yes ", ["yes"], 1.0),                              # prediction stripped, case-insensitive strings
    ("50", ["50%"], 0.0),                                 # 50 vs 0.5
    ("about 100", ["100"], 0.0),
    ("7", ["x", "7.2"], 1.0),                             # best over answers
])
def test_relaxed_accuracy(pred, answers, expected):
    assert relaxed_accuracy(pred, answers) == expected


@pytest.mark.parametrize("pred, answers, category, expected", [
    ("x ^ { 2 } + 1", ["x^{2}+1"], OCRBENCH_HME, True),   # spaces removed
    ("x^{2}\n+1", ["x^{2} + 1"], OCRBENCH_HME, True),     # newlines too
    ("X^{2}+1", ["x^{2}+1"], OCRBENCH_HME, False),        # case kept for maths
    ("x^{2}\t+1", ["x^{2}+1"], OCRBENCH_HME, False),      # the reference leaves tabs
    ("The word is CENTRE.", ["centre"], "Regular Text Recognition", True),
    ("hello\nworld", ["hello world"], "Scene Text-centric VQA", True),
    ("centr", ["centre"], "Regular Text Recognition", False),
    ("anything", ["nope", ""], "Doc-oriented VQA", True),  # an empty answer is in every prediction
])
def test_ocrbench_hit(pred, answers, category, expected):
    assert ocrbench_hit(pred, answers, category) is expected


def test_accuracy():
    assert accuracy(" Paris ", ["paris"]) == 1.0 and accuracy("paris.", ["paris"]) == 0.0


OPTS = {"A": "red circle", "B": "blue square", "C": "green triangle", "D": "yellow star"}


@pytest.mark.parametrize("text, expected", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("The answer is B", "B"), ("Answer: [C]", "C"),
    ("blue square", "B"),                                   # option text instead of a letter
    ("It is a blue square", "B"),                           # lowercase "a" is not option A
    ("A or B", None),                                       # two letters
    ("Cannot determine the answer", "Z"), ("Z", "Z"),       # refusals
    ("The correct answer is B. Here's why: option B has four equal sides and it is blue.", "B"),
    ("B is correct because the square is blue and big", None),  # letter not near the end, no "answer is"
    ("b", None),                                            # letters are case-sensitive
    ("green triangle or yellow star", None),                # two option texts
    ("Failed to obtain answer via API", None),
])
def test_extract_choice(text, expected):
    assert extract_choice(text, OPTS) == expected


def test_extract_choice_rejects_bad_option_keys():
    with pytest.raises(ValueError, match="single letters"):
        extract_choice("A", {"1": "x"})


def test_circular():
    variants = circular_variants({"A": "a", "B": "b", "C": "c", "D": "d"}, "B")
    assert variants[0] == ({"A": "a", "B": "b", "C": "c", "D": "d"}, "B")
    assert variants[1] == ({"A": "d", "B": "a", "C": "b", "D": "c"}, "C")
    assert [ans for _, ans in variants] == ["B", "C", "D", "A"]
    for opts, ans in variants:
        assert opts[ans] == "b"
    assert circular_hit([1.0, 1.0, 1.0]) == 1.0 and circular_hit([1.0, 0.0, 1.0]) == 0.0 and circular_hit([]) == 0.0


@pytest.mark.parametrize("pred, answer, expected", [
    ("The total is 1,234.5", "1234.5", 1.0), ("3", "3.0000001", 1.0), ("3", "3.1", 0.0), ("no number", "3", 0.0),
    ("-2e-3 then 7", "7", 1.0),
])
def test_numeric_match(pred, answer, expected):
    assert numeric_match(pred, answer) == expected


def test_extract_boxed_and_grounding():
    assert extract_boxed("<think>try \\boxed{1}</think> so \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_boxed("<think>\\boxed{3}</think> it is 4") is None and extract_boxed("plain") is None
    assert grounding_iou("[0, 0, 100, 100]", "[50, 0, 150, 100]") == pytest.approx(1 / 3)
    assert grounding_hit("[0, 0, 100, 100]", "[50, 0, 150, 100]") == 0.0
    assert grounding_hit("box [10, 10, 100, 100]", "[0, 0, 100, 100]") == 1.0


def test_metrics_need_answers():
    for fn in (vqa_accuracy, anls, relaxed_accuracy, accuracy):
        with pytest.raises(ValueError, match="non-empty list"):
            fn("x", [])
