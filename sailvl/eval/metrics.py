"""Answer metrics and answer extraction, pure functions, each matching a named reference convention.

Per item, these give the values the reference toolkits give on the same input (their quirks included,
each one named in the docstring that reproduces it):
  - `vqa_accuracy`: VQA accuracy (official VQA normalisation, leave-one-out min(1, matches / 3));
  - `anls`: ANLS, threshold 0.5 (DocVQA / InfoVQA);
  - `relaxed_accuracy`: ChartQA relaxed accuracy (5% numeric tolerance, else exact string);
  - `ocrbench_hit`: OCRBench substring hit (handwritten maths compared without spaces / newlines);
  - `accuracy`: VLMEvalKit's plain accuracy (stripped, lower-cased equality; OCRVQA / GQA);
  - `extract_choice`: the option letter a free-form reply chose (VLMEvalKit `can_infer`);
  - `circular_variants` / `circular_hit`: MMBench-style circular evaluation;
  - `numeric_match`, `extract_boxed`, `grounding_iou` / `grounding_hit` (0-1000 boxes, hit at IoU >= 0.5);
and the synthetic world's: `normalize_short`, `exact_match`, `token_f1`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

from ..data.template import THINK_END, last_boxed

_BOX = re.compile(r"\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\]")


def _check_answers(answers: Sequence[str], metric: str) -> None:
    if isinstance(answers, str) or not answers:
        raise ValueError(f"{metric} needs a non-empty list of ground-truth answers, got {answers!r}")


# ------------------------------------------------------------------------------- synthetic world
def normalize_short(text: str) -> str:
    """Lower-case, trim, drop surrounding quotes and one trailing period (short answers)."""
    t = text.strip().lower()
    t = t.strip("\"'` ")
    return t[:-1].strip() if t.endswith(".") else t


def exact_match(prediction: str, answer: str) -> float:
    """1.0 when `normalize_short` makes both equal (the synthetic world's scorer)."""
    return float(normalize_short(prediction) == normalize_short(answer))


def token_f1(prediction: str, answer: str) -> float:
    """SQuAD-style bag-of-words F1 over `normalize_short`-ed whitespace tokens (captions)."""
    p, a = normalize_short(prediction).split(), normalize_short(answer).split()
    common = sum((Counter(p) & Counter(a)).values())
    if not p or not a or not common:
        return float(p == a)
    precision, recall = common / len(p), common / len(a)
    return 2 * precision * recall / (precision + recall)


# ----------------------------------------------------------------------------------- grounding
def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """The first "[x1, y1, x2, y2]" in the text, or None."""
    m = _BOX.search(text)
    return tuple(float(g) for g in m.groups()) if m else None


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def grounding_iou(prediction: str, answer: str) -> float:
    """IoU of the first box in the prediction and in the answer (0-1000 coordinates); 0.0 if either has none."""
    p, a = parse_box(prediction), parse_box(answer)
    return box_iou(p, a) if p is not None and a is not None else 0.0


def grounding_hit(prediction: str, answer: str, threshold: float = 0.5) -> float:
    """1.0 when the boxes overlap with IoU >= threshold (the usual referring-grounding accuracy)."""
    p, a = parse_box(prediction), parse_box(answer)
    return float(p is not None and a is not None and box_iou(p, a) >= threshold)


# ------------------------------------------------------------------------------ VQA accuracy
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the reference's pattern, verbatim: a period not before a digit
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# The official VQA contraction table (GT-Vision-Lab/VQA vqaEval.py), "written form=normalised form". Its
# capitalised keys never match (words are lower-cased first) and "somebody'd" maps backwards; both kept.
def _pairs(text: str) -> dict[str, str]:
    return dict(pair.split("=") for pair in text.split())


_CONTRACTIONS = _pairs("""
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've couldnt've=couldn't've
didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've hadn'tve=hadn't've hasnt=hasn't
havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd howll=how'll hows=how's Id've=I'd've
I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am
mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at
shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't
shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've
somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd someoned've=someone'd've
someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd
somethingd've=something'd've something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd theyd've=they'd've
they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've
we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's
whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll
whos=who's whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've
y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've youll=you'll
youre=you're youve=you've
""")


def vqa_normalize(text: str) -> str:
    """The official VQA answer normalisation (vqaEval.py; VLMEvalKit `process_answer`).

    Newlines / tabs -> spaces, strip; each punctuation mark is deleted when it touches a space anywhere in
    the text (or the text has a digit,digit comma), otherwise replaced by a space; periods not followed by
    a digit are deleted (at most 32 of them: the reference passes re.UNICODE (= 32) as `count`); then
    lower-case, number words zero..ten (and "none") -> digits, articles dropped, contractions restored."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    strip_all = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        if strip_all or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out, count=32)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy of one prediction against the human answers (usually 10).

    Source: VLMEvalKit `process_line(method="vqa_score")` + `hit_calculate` (TextVQA), which follows the
    official VQA eval: prediction and every answer pass `vqa_normalize`; for each answer i, acc_i =
    min(1, #{j != i : answer_j == prediction} / 3) (leave-one-out over the 10-choose-9 subsets); the score
    is the mean of acc_i, computed exactly (one rounding). Difference from GT-Vision-Lab's vqaEval.py: it
    normalises the answers only when they disagree, and then only their punctuation; answers that are
    already normalised (the VQA / TextVQA annotation files) score the same either way."""
    _check_answers(answers, "vqa_accuracy")
    pred = vqa_normalize(str(prediction))
    gts = [vqa_normalize(str(a)) for a in answers]
    hits = sum(g == pred for g in gts)
    # leaving out a matching answer leaves hits - 1 matches, leaving out any other leaves hits
    total_thirds = sum(min(3, hits - (g == pred)) for g in gts)
    return total_thirds / (3 * len(gts))


# ------------------------------------------------------------------------------------- ANLS
def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert / delete / substitute, each 1)."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction: str, answers: list[str], threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity of one prediction (DocVQA / InfoVQA).

    Source: the DocVQA / ST-VQA evaluation as in lmms-eval `anls` and VLMEvalKit `anls_compute` +
    `hit_calculate`: both strings are lower-cased and whitespace-collapsed (strip, split, join with single
    spaces) for the distance, but the distance is divided by the longer of the *raw* strings' lengths
    (len(s.upper()), a quirk the references share); similarity = 1 - min over answers of that ratio,
    and a similarity below `threshold` counts 0 (exactly 0.5 is kept). (One VLMEvalKit revision divides by
    the normalised lengths instead; the two differ only when a string has surrounding or repeated spaces.)"""
    _check_answers(answers, "anls")
    pred = str(prediction)
    det = " ".join(pred.strip().lower().split())
    ratios = []
    for a in answers:
        a = str(a)
        gt = " ".join(a.strip().lower().split())
        length = max(len(a.upper()), len(pred.upper()))
        ratios.append(0.0 if length == 0 else levenshtein(gt, det) / length)
    score = 1.0 - min(ratios)
    return 0.0 if score < threshold else score


# ------------------------------------------------------------------------------ relaxed accuracy
def _relaxed_float(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correctness(target: str, prediction: str, max_relative_change: float = 0.05) -> bool:
    """One answer: |prediction - target| / |target| <= 5% when both parse as floats ("12%" -> 0.12) and the
    target is non-zero; otherwise case-insensitive string equality. A target of "0" (or "0%", "0.0") takes
    the string path, so only the literal same string matches it (pix2struct / VLMEvalKit quirk)."""
    p, t = _relaxed_float(prediction), _relaxed_float(target)
    if p is not None and t:
        return abs(p - t) / abs(t) <= max_relative_change
    return prediction.lower() == target.lower()


def relaxed_accuracy(prediction: str, answers: list[str]) -> float:
    """ChartQA relaxed accuracy: 1.0 if the stripped prediction is relaxed-correct for any answer, else 0.0.

    Source: pix2struct `relaxed_correctness` as used by VLMEvalKit `process_line(method="relaxed_accuracy")`
    + `hit_calculate` (max over answers): only the prediction is stripped; the answer is the target.
    (A 2024 VLMEvalKit revision passed the two the other way round, dividing by the prediction.)"""
    _check_answers(answers, "relaxed_accuracy")
    pred = str(prediction).strip()
    return float(any(relaxed_correctness(str(a), pred) for a in answers))


def accuracy(prediction: str, answers: list[str]) -> float:
    """VLMEvalKit `process_line(method="accuracy")` + max (OCRVQA, GQA): stripped, lower-cased equality
    with any answer."""
    _check_answers(answers, "accuracy")
    pred = str(prediction).strip().lower()
    return float(any(str(a).strip().lower() == pred for a in answers))


# -------------------------------------------------------------------------------------- OCRBench
OCRBENCH_HME = "Handwritten Mathematical Expression Recognition"


def ocrbench_hit(prediction: str, answers: list[str], category: str) -> bool:
    """OCRBench: True when some answer is a substring of the prediction.

    Source: VLMEvalKit `OCRBench.evaluate`. For the category "Handwritten Mathematical Expression
    Recognition", both are stripped, newlines become spaces and all spaces are removed, case kept (other
    whitespace such as tabs stays, as in the reference); for every other category both are lower-cased,
    stripped and newlines become spaces. An empty answer is a substring of anything."""
    _check_answers(answers, "ocrbench_hit")
    pred = str(prediction)
    if category == OCRBENCH_HME:
        pred = pred.strip().replace("\n", " ").replace(" ", "")
        return any(str(a).strip().replace("\n", " ").replace(" ", "") in pred for a in answers)
    pred = pred.lower().strip().replace("\n", " ")
    return any(str(a).lower().strip().replace("\n", " ") in pred for a in answers)


# ----------------------------------------------------------------------------- multiple choice
_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", "Cannot determine the answer")
_SPLIT_CHARS = str.maketrans({c: " " for c in ".()[],:;!*#{}"})
_ANSWER_IS = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def _infer_letter(text: str, options: dict[str, str]) -> str | None:
    if "Failed to obtain answer via API" in text:
        return None
    if any(r in text for r in _REFUSALS):
        return "Z"
    tokens = text.translate(_SPLIT_CHARS).split()
    present = [k for k in options if k in tokens]
    if len(present) == 1:
        if tokens.index(present[0]) > len(tokens) - 5:  # the letter's first mention is among the last 4 tokens
            return present[0]
    elif not present and "Z" in tokens:
        return "Z"
    m = _ANSWER_IS.search(text)
    if m and m.group(1).upper() in options:
        return m.group(1).upper()
    return None


def _infer_text(text: str, options: dict[str, str]) -> str | None:
    low = text.lower()
    if len(low) > 2 * sum(len(str(v)) for v in options.values()):
        return None
    found = [k for k, v in options.items() if str(v).lower() in low]
    return found[0] if len(found) == 1 else None


def extract_choice(text: str, options: dict[str, str]) -> str | None:
    """The option letter a free-form reply chose, "Z" for an explicit refusal, None when rules cannot tell.

    Source: VLMEvalKit `matching_util.can_infer` (current: with PR #1175's near-the-end rule and length
    guard and PR #1552's "answer is X" fallback). First by letter: a known refusal sentence -> "Z"; the
    text with `.()[],:;!*#{}` turned into spaces is split into tokens; if exactly one option letter occurs
    as a token and its first occurrence is among the last 4 tokens, that letter ("B", "(B)", "B.", "The
    answer is B"); if no letter occurs but a "Z" token does, "Z"; else "[correct] answer is [**]X" (X in
    A-D, case-insensitive). Then by option text: when the reply is at most twice as long as all option
    texts together and exactly one option's text occurs in it (case-insensitive), that option's letter.
    (VLMEvalKit's VERBOSE-only rule about a leading article "A" is not reproduced.)"""
    bad = [k for k in options if not (isinstance(k, str) and len(k) == 1 and "A" <= k <= "Z")]
    if bad:
        raise ValueError(f"option keys must be single letters A-Z, got {bad}")
    text = str(text)
    return _infer_letter(text, options) or _infer_text(text, options)


def circular_variants(options: dict[str, str], answer: str) -> list[tuple[dict[str, str], str]]:
    """MMBench CircularEval (VLMEvalKit): n passes of an n-option question; pass k keeps the letters and
    shifts the option texts k places down (pass 1 of A..D shows d, a, b, c). Returns (options, answer
    letter) per pass; pass 0 is the original."""
    if answer not in options:
        raise ValueError(f"answer {answer!r} is not one of the options {sorted(options)}")
    letters, texts = list(options), list(options.values())
    n, pos = len(letters), letters.index(answer)
    return [({letters[i]: texts[(i - k) % n] for i in range(n)}, letters[(pos + k) % n]) for k in range(n)]


def circular_hit(hits: Sequence[float]) -> float:
    """A circular question counts 1.0 only when every pass is right."""
    return float(bool(hits) and all(h >= 1.0 for h in hits))


# -------------------------------------------------------------------------- numbers and \boxed{}
_NUMBER = re.compile(r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?")


def parse_number(text: str) -> float | None:
    """The last number in the text ("1,234.5", "-3", "2e-3", "45%" -> 45.0), or None."""
    found = _NUMBER.findall(str(text))
    return float(found[-1].replace(",", "")) if found else None


def numeric_match(prediction: str, answer: str, rel_tol: float = 0.0, abs_tol: float = 1e-6) -> float:
    """1.0 when the last number in the prediction equals the answer's number within
    math.isclose(rel_tol, abs_tol) (our convention for numeric answers); 0.0 when either has no number."""
    p, a = parse_number(prediction), parse_number(answer)
    return float(p is not None and a is not None and math.isclose(p, a, rel_tol=rel_tol, abs_tol=abs_tol))


def extract_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} after </think> (the SAIL-VL2 thinking format, as
    `parse_thinking` reads it), or None when the reply has no box."""
    return last_boxed(text.split(THINK_END, 1)[-1])
