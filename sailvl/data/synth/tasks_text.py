"""Task generators over rendered text (OCR, charts, tables, arithmetic), caption-style pretraining
transcripts of every kind of image, and text-only instructions.

Same signature as tasks_scene: `gen(rng, world) -> (record, images)`, with the spec in `record["meta"]`.
`math_cot` writes a real step-by-step trace (count up / count down / repeated addition, or with
`World(math_trace="short")` just the problem read and the result) inside
`<think>` and the result in `\\boxed{}`; `math_direct` asks the same problem for a direct answer.
"""

from __future__ import annotations

import random

from . import render as R
from .record import make_record
from .scene import caption, random_scene, render
from .tasks_scene import conversation
from .world import THINK_SUFFIX, World

OCR_QUESTION = "What is written in the image?"
MATH_QUESTION = "What is the answer to the problem in the image?"
PRETRAIN_PROMPTS = ("Describe the image briefly.", "Write a short caption for the image.",
                    "What does the image show?")


def ocr(rng: random.Random, world: World):
    spec, img = R.make_text_image(rng, world)
    q = OCR_QUESTION + world.suffix
    return make_record("ocr", q, spec["text"], spec, n_images=1), [img]


def _chart_question(rng: random.Random, spec: dict, question: str | None = None, i: int | None = None):
    """(question kind, text, answer, args) for value lookup (of item i, default random), argmax, argmin or
    difference."""
    labels, values = spec["labels"], spec["values"]
    question = question or rng.choice(("value", "max", "min", "diff"))
    if question == "value":
        i = rng.randrange(len(labels)) if i is None else i
        return question, f"What is the value of {labels[i]}?", str(values[i]), [labels[i]]
    if question == "max":
        return question, "Which label has the highest value?", labels[values.index(max(values))], []
    if question == "min":
        return question, "Which label has the lowest value?", labels[values.index(min(values))], []
    i, j = rng.sample(range(len(labels)), 2)
    if values[i] < values[j]:
        i, j = j, i
    return question, f"How much larger is {labels[i]} than {labels[j]}?", str(values[i] - values[j]), \
        [labels[i], labels[j]]


CHART_READ_QUESTION = "Read the chart from left to right."
# a chart trace's line for the highest / lowest value's label: (its first word, the sign that makes it a max)
EXTREMES = {"max": ("Highest", 1), "min": ("Lowest", -1)}


def chart_trace(spec: dict, question: str, args: list[str]) -> list[str]:
    """The reasoning for a chart question, one line each: the chart read left to right ("Y=5, N=8, B=4."), then each
    label the question names with its value ("B=4."), or the label of the highest / lowest value with it ("Highest:
    N=8."), then for a difference the subtraction. A value is one token after its label (no space between: the
    tokenizer gives a space before a digit a token of its own), the layout in which a bare LLM learns lookups fastest
    (`benchmarks/induction.py`). `text_induction` teaches these lookups in this layout: chart alone then finds a named
    label's value 0.95 through the trace, while the whole recipe still misreads the labels (demo log, session 28)."""
    value = dict(zip(spec["labels"], spec["values"]))
    lines = ["From left to right: " + ", ".join(f"{lab}={v}" for lab, v in value.items()) + "."]
    if question in EXTREMES:
        lab = max(value, key=lambda k: value[k] * EXTREMES[question][1])
        lines.append(f"{EXTREMES[question][0]}: {lab}={value[lab]}.")
    if args:
        lines.append(", ".join(f"{lab}={value[lab]}" for lab in args) + ".")
    if question == "diff":
        a, b = args
        lines.append(f"{value[a]} - {value[b]} = {value[a] - value[b]}.")
    return lines


def chart_place(i: int, k: int) -> str:
    """Where item i of k stands in a chart, in words: "on the left" / "in the middle" / "on the right" for three,
    else "number {i + 1} from the left"."""
    if k == 3:
        return ("on the left", "in the middle", "on the right")[i]
    return f"number {i + 1} from the left"


def chart(rng: random.Random, world: World):
    """Value lookup, argmax, argmin or difference on a bar or line chart; with `World(chart_trace="read")` asked
    for thinking, the reply reading the chart (`chart_trace`) inside <think> before the answer in \\boxed{}."""
    spec, img = R.make_chart(rng, world)
    question, q, answer, args = _chart_question(rng, spec)
    meta = {**spec, "question": question, "args": args}
    if world.chart_trace == "none":
        return make_record("chart", q + world.suffix, answer, meta, n_images=1), [img]
    reply = "<think>\n" + "\n".join(chart_trace(spec, question, args)) + \
        f"\n</think>\n\nThe answer is \\boxed{{{answer}}}."
    return make_record("chart", q + THINK_SUFFIX, answer, meta, reply=reply, n_images=1), [img]


def _table_question(spec: dict, j: int, i: int) -> tuple[str, str]:
    return f"What is the value in row {spec['rows'][j]}, column {spec['cols'][i]}?", str(spec["cells"][j][i])


def table(rng: random.Random, world: World):
    spec, img = R.make_table(rng, world)
    j, i = rng.randrange(len(spec["rows"])), rng.randrange(len(spec["cols"]))
    q, answer = _table_question(spec, j, i)
    return make_record("table", q + world.suffix, answer, {**spec, "row": spec["rows"][j], "col": spec["cols"][i]},
                       n_images=1), [img]


def _sequence(values: list[int]) -> str:
    return ", ".join(str(v) for v in values)


def think_trace(a: int, op: str, b: int, style: str = "steps") -> list[str]:
    """The reasoning steps for a op b, one line each: the problem read from the image, then ("steps") the
    counting / repeated addition that computes it, then the result."""
    glyph = R.OP_GLYPH[op]
    result = R.OPS[op](a, b)
    lines = [f"The image shows {a} {glyph} {b}."]
    if style == "short":
        return lines + [f"So {a} {glyph} {b} = {result}."]
    if op == "+":
        if b == 0:
            lines.append(f"Adding 0 leaves {a} unchanged.")
        elif b <= 10:
            lines.append(f"Start at {a} and count up {b}: {_sequence(list(range(a + 1, a + b + 1)))}.")
        else:
            tens, ones = b - b % 10, b % 10
            lines.append(f"{a} + {tens} = {a + tens}, then {a + tens} + {ones} = {result}.")
    elif op == "-":
        if b == 0:
            lines.append(f"Taking away 0 leaves {a} unchanged.")
        elif b <= 10:
            lines.append(f"Start at {a} and count down {b}: {_sequence(list(range(a - 1, a - b - 1, -1)))}.")
        else:
            tens, ones = b - b % 10, b % 10
            lines.append(f"{a} - {tens} = {a - tens}, then {a - tens} - {ones} = {result}.")
    else:
        if a == 0 or b == 0:
            lines.append("Anything times 0 is 0.")
        elif b <= 10:
            lines.append(f"Add {a} {b} time{'s' if b != 1 else ''}: {_sequence([a * k for k in range(1, b + 1)])}.")
        else:
            lines.append(f"{a} {glyph} {b} = {a} {glyph} {b - b % 10} + {a} {glyph} {b % 10} "
                         f"= {a * (b - b % 10)} + {a * (b % 10)} = {result}.")
    lines.append(f"So {a} {glyph} {b} = {result}.")
    return lines


def math_cot(rng: random.Random, world: World):
    spec, img = R.make_equation_image(rng, world)
    answer = str(spec["result"])
    reply = "<think>\n" + "\n".join(think_trace(spec["a"], spec["op"], spec["b"], world.math_trace)) + \
        f"\n</think>\n\nThe answer is \\boxed{{{answer}}}."
    q = "Solve the problem in the image." + THINK_SUFFIX
    return make_record("math_cot", q, answer, spec, reply=reply, n_images=1), [img]


def math_direct(rng: random.Random, world: World):
    spec, img = R.make_equation_image(rng, world)
    q = MATH_QUESTION + world.suffix
    return make_record("math_direct", q, str(spec["result"]), spec, n_images=1), [img]


def caption_pretrain(rng: random.Random, world: World):
    """Caption-style pretraining: a short instruction and the dense transcript of any kind of image
    (scene caption, OCR transcript, equation, chart data, table contents)."""
    kind = rng.choice(("scene", "text", "equation", "chart", "table"))
    if kind == "scene":
        scene = random_scene(rng, world, rng.randint(1, world.max_objects))
        spec, img = {"scene": [o.to_dict() for o in scene]}, render(scene, world)
        text = caption(scene, world.image_size)
    elif kind == "text":
        spec, img = R.make_text_image(rng, world)
        text = R.describe_text(spec)
    elif kind == "equation":
        spec, img = R.make_equation_image(rng, world)
        text = R.describe_equation(spec)
    elif kind == "chart":
        spec, img = R.make_chart(rng, world)
        text = R.describe_chart(spec)
    else:
        spec, img = R.make_table(rng, world)
        text = R.describe_table(spec)
    return make_record("caption_pretrain", rng.choice(PRETRAIN_PROMPTS), text, {**spec, "image_kind": kind},
                       n_images=1), [img]


def text_drill(rng: random.Random, world: World):
    """Training only: several questions about one rendered-text image (the OCR, chart, table and arithmetic
    tasks' phrasings, plus the text's colour and the equation's transcript), as one conversation: every
    value of a chart and its max / min / a difference, every cell of a table; with `World(chart_label_drill=True)`
    also each chart label by its place. With `World(chart_trace="read")` a chart's conversation opens with its
    reading (`CHART_READ_QUESTION`, answered as the trace's first line)."""
    kind = rng.choice(("text", "chart", "table", "equation"))
    if kind == "text":
        spec, img = R.make_text_image(rng, world)
        turns = [(OCR_QUESTION, spec["text"]), ("What colour is the text?", spec["colour"])]
    elif kind == "chart":
        spec, img = R.make_chart(rng, world)
        turns = [_chart_question(rng, spec, "value", i)[1:3] for i in range(len(spec["labels"]))]
        turns += [_chart_question(rng, spec, rng.choice(("max", "min")))[1:3], _chart_question(rng, spec, "diff")[1:3]]
        if world.chart_label_drill:  # each label by its place: reading the labels alone, before finding one
            turns += [(f"Which label is {chart_place(i, len(spec['labels']))}?", lab)
                      for i, lab in enumerate(spec["labels"])]
    elif kind == "table":
        spec, img = R.make_table(rng, world)
        turns = [_table_question(spec, j, i) for j in range(len(spec["rows"])) for i in range(len(spec["cols"]))]
    else:
        spec, img = R.make_equation_image(rng, world)
        turns = [(MATH_QUESTION, str(spec["result"])), (OCR_QUESTION, spec["text"])]
    rng.shuffle(turns)
    if kind == "chart" and world.chart_trace == "read":  # read first: the questions then look up in the transcript
        turns.insert(0, (CHART_READ_QUESTION, chart_trace(spec, "value", [])[0]))
    record = make_record("text_drill", "", turns[-1][1], {**spec, "image_kind": kind}, n_images=1)
    record["conversations"] = conversation([(q, a, q != CHART_READ_QUESTION) for q, a in turns], world)
    return record, [img]


# ---------------------------------------------------------------- text-only instructions

WORD_POOL = ("red", "green", "blue", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "book", "cup",
             "star", "box", "car", "hat", "key", "milk", "rain", "ship", "lamp", "door", "cake", "egg")
COLOUR_FACTS = {"the sky on a clear day": "blue", "grass": "green", "a ripe banana": "yellow", "snow": "white",
                "coal": "black", "a ripe tomato": "red", "an orange": "orange", "a lemon": "yellow",
                "the sea": "blue", "a leaf in summer": "green", "chocolate": "brown", "an elephant": "gray",
                "a flamingo": "pink", "a crow": "black", "milk": "white", "a plum": "purple",
                "a carrot": "orange", "a strawberry": "red"}
MIXES = {("red", "yellow"): "orange", ("blue", "yellow"): "green", ("red", "blue"): "purple",
         ("red", "white"): "pink", ("black", "white"): "gray"}
SIDES = {"triangle": 3, "square": 4, "rectangle": 4, "pentagon": 5, "hexagon": 6, "octagon": 8}
# Kinds with a small content space (facts, letters) are seen whole in training, so a disjoint test split
# holds only the open-ended ones: the list operations (first / last / repeat / reverse / sort / count) and
# comparisons, which test following an instruction on unseen input rather than recalling it.
TEXT_KINDS = ("reverse", "count_on", "colour_fact", "colour_mix", "sides", "arithmetic", "sort", "letters",
              "larger", "first", "last", "repeat", "count_words")
# the open-ended subset of TEXT_KINDS (what the test split holds; text_lists draws only these)
LIST_KINDS = ("reverse", "count_on", "sort", "larger", "first", "last", "repeat", "count_words")


def text_instruct(rng: random.Random, world: World, kinds: tuple[str, ...] = TEXT_KINDS):
    """Simple verifiable language tasks; `meta.kind` names the kind."""
    kind = rng.choice(kinds)
    if kind == "reverse":
        words = rng.sample(WORD_POOL, rng.randint(2, 4))
        q, a = f"Reverse the order of these words: {', '.join(words)}.", ", ".join(reversed(words))
    elif kind == "count_on":
        step, start = rng.choice((1, 1, 2)), rng.randint(0, 20)
        seq = [start + step * k for k in range(6)]
        q, a = f"Continue the sequence with three more numbers: {_sequence(seq[:3])}.", _sequence(seq[3:])
    elif kind == "colour_fact":
        thing = rng.choice(sorted(COLOUR_FACTS))
        q, a = f"What colour is {thing}?", COLOUR_FACTS[thing]
    elif kind == "colour_mix":
        (c1, c2), res = rng.choice(sorted(MIXES.items()))
        if rng.random() < 0.5:
            c1, c2 = c2, c1
        q, a = f"What colour do you get when you mix {c1} and {c2} paint?", res
    elif kind == "sides":
        shape = rng.choice(sorted(SIDES))
        q, a = f"How many sides does a {shape} have?", str(SIDES[shape])
    elif kind == "arithmetic":
        x, op, y, res = R.random_problem(rng, world)
        q, a = f"What is {x} {R.OP_GLYPH[op]} {y}?", str(res)
    elif kind == "sort":
        nums = rng.sample(range(21), rng.randint(3, 4))
        q, a = f"Sort these numbers from smallest to largest: {_sequence(nums)}.", _sequence(sorted(nums))
    elif kind == "letters":
        word = rng.choice(R.WORDS)
        if rng.random() < 0.5:
            q, a = f"How many letters are in the word {word}?", str(len(word))
        else:
            q, a = f"What is the first letter of the word {word}?", word[0]
    elif kind in ("first", "last"):
        words = rng.sample(WORD_POOL, rng.randint(2, 4))
        q, a = f"What is the {kind} word in this list: {', '.join(words)}?", words[0 if kind == "first" else -1]
    elif kind == "repeat":
        words = rng.sample(WORD_POOL, rng.randint(2, 3))
        q, a = f"Repeat these words: {', '.join(words)}.", ", ".join(words)
    elif kind == "count_words":
        words = rng.sample(WORD_POOL, rng.randint(2, 5))
        q, a = f"How many words are in this list: {', '.join(words)}?", str(len(words))
    else:
        x, y = rng.sample(range(21), 2)
        q, a = f"Which number is larger, {x} or {y}?", str(max(x, y))
    return make_record("text_instruct", q, a, {"kind": kind}), []


RECALL_SYMBOLS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ123456789"


def text_recall(rng: random.Random, world: World):
    """Training only: repeat a random string of capitals and digits exactly ("EQH635YNG6BY", one token per
    character), or look a key up in a list of key=value pairs (the chart question's phrasing). A transformer looks
    up in context with an induction circuit, which random repeats form: the tiny recipe's LLM shape on one-token
    lookups stays at chance after 600 steps of lookups alone and reaches 0.99 when half the samples are repeats
    (`benchmarks/induction.py`; from the recipe's smaller initial weights at ~1,000 steps). In the synthetic world's
    chat format (this generator alone) it learns the repeats (0.99-1.00) but its lookups stay at 0.31-0.38 after 600
    steps and 0.34 after 1,800 (demo log, session 26); not in the tiny recipe."""
    if rng.random() < 0.5:
        run = "".join(rng.choice(RECALL_SYMBOLS) for _ in range(rng.randint(6, 12)))
        return make_record("text_recall", f"Repeat exactly: {run}", run, {"kind": "copy"}), []
    k = rng.randint(3, 6)
    keys, values = rng.sample(RECALL_SYMBOLS[:26], k), [rng.randint(1, 9) for _ in range(k)]
    i = rng.randrange(k)
    pairs = ", ".join(f"{key}={v}" for key, v in zip(keys, values))
    return make_record("text_recall", f"{pairs}.\nWhat is the value of {keys[i]}?", str(values[i]),
                       {"kind": "lookup"}), []


def text_induction(rng: random.Random, world: World):
    """Training only, plain-text prompt-completion records (no chat template; the completion is trained): a random
    run of capitals and digits written twice ("EQH635." -> "EQH635", one token per character), or three one-token
    key=value pairs as `chart_trace` reads a chart, then on a new line a key to look up, after another key's pair
    or not, as its lines naming labels start ("Y=5, N=8, B=4.\nB=" -> "4"; "Y=5, N=8, B=4.\nN=8, Y=" -> "5"), or
    the highest / lowest value's label with its value ("Y=5, N=8, B=4.\nHighest: " -> "N=8"). The
    text on which a transformer forms induction heads, the circuit that looks a key's value up in context
    (`benchmarks/induction.py`). In the sailvl trainer the tiny recipe's LLM learnt these lookups (0.99 after 1,200
    steps from the recipe's init: sessions 27-29's llm_warmup stage); from there, chart questions trained alone
    through the reading trace found a named label's value 0.95 (0.34 from an LLM warmed up on "X:9,A:4,Q:6.Q="
    lookups, the layout this had before; demo log, session 28). The loss is on the completion: on every token, the toy
    had not formed the heads by 1,000 steps (demo log, session 27)."""
    if rng.random() < 0.5:
        run = "".join(rng.choice(RECALL_SYMBOLS) for _ in range(rng.randint(4, 12)))
        return {"task": "text_induction", "answer": run, "prompt": f"{run}.", "completion": run,
                "meta": {"kind": "repeat"}}, []
    keys, values = rng.sample(RECALL_SYMBOLS[:26], 3), rng.sample(RECALL_SYMBOLS[26:], 3)
    spec = {"labels": keys, "values": [int(v) for v in values]}
    if rng.random() < 0.4:  # the highest / lowest value's label and its value
        question, args = rng.choice(sorted(EXTREMES)), []
    else:
        question, i = "value", rng.randrange(3)
        args = [keys[i]]
        if rng.random() < 0.4:  # a difference's line names two labels: the second is looked up after the first's pair
            args.insert(0, keys[rng.choice([x for x in range(3) if x != i])])
    # chart_trace's own lines, so the layout is the trace's: its reading, then the line asked for cut before the
    # looked-up part (the value after the last "=", or for an extreme the label and value after "Highest: ")
    reading, line = chart_trace(spec, question, args)[:2]
    line = line.removesuffix(".")
    cut = len(EXTREMES[question][0]) + 2 if question in EXTREMES else line.rindex("=") + 1
    prompt = reading.removeprefix("From left to right: ") + "\n" + line[:cut]
    return {"task": "text_induction", "answer": line[cut:], "prompt": prompt, "completion": line[cut:],
            "meta": {"kind": "lookup" if question == "value" else question}}, []


def text_lists(rng: random.Random, world: World):
    """Training only: text_instruct's open-ended kinds (LIST_KINDS: list operations, sequences, comparisons), the
    ones its test split holds. The records are text_instruct's (task name included), so a split written after them
    leaves out every question they ask (`generate_splits` hashes the task name with the content)."""
    return text_instruct(rng, world, LIST_KINDS)
