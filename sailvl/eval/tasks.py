"""Tasks as data: a `TaskSpec` names the data, the prompt template, the generation settings, the answer
parser, the metric and a version; `resolve_tasks` turns a name or a path into specs.

Built in:
  - `synth` (all abilities) and `synth/<ability>`: the synthetic world's test split, one task per ability
    (generated under the output directory unless `data` points to a test.jsonl, e.g. the demo's);
  - VLMEvalKit TSV names with their reference metric and prompt: MMStar (multiple choice, letter
    extraction), OCRBench (substring hit), ChartQA_TEST (relaxed accuracy), DocVQA_VAL (ANLS),
    TextVQA_VAL (VQA accuracy); the file is `data`, else NAME.tsv under $LMUData or ~/LMUData
    (VLMEvalKit's data root);
  - any path: a .tsv (VLMEvalKit format; the metric follows the file name as VLMEvalKit's does, else
    multiple choice when it has option columns, else plain accuracy), a .jsonl question file (`items.py`;
    multiple choice when items have options, else exact match), or a .json TaskSpec.

Prompt templates fill {question}, {options} ("\\nA. ...\\nB. ..." or "") and {hint} ("hint\\n" or "");
`<image>` placeholders are prepended (one per image) unless the question already places them.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..data.schema import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from ..data.template import CHOICE_SUFFIX, SHORT_ANSWER_SUFFIX, THINK_END, THINK_SUFFIX, parse_thinking
from . import metrics as M
from .items import EvalItem, read_jsonl_items
from .tsv import read_vlmeval_tsv

SHORT_PROMPT = "{question}" + SHORT_ANSWER_SUFFIX
CHOICE_PROMPT = "{hint}{question}{options}" + CHOICE_SUFFIX
SYNTH_CAPTION_TASKS = ("caption", "caption_pretrain")
SYNTH_THINKING_TASKS = ("math_cot",)
SYNTH_ITEMS_PER_TASK = 50


@dataclass
class GenerationSettings:
    """Greedy by default (the field's evaluation decoding); thinking mode gets its own token budget."""

    max_new_tokens: int = 1024
    thinking_max_new_tokens: int = 4096
    temperature: float = 0.0
    top_p: float = 1.0

    def budget(self, think: bool) -> int:
        return self.thinking_max_new_tokens if think else self.max_new_tokens


@dataclass
class TaskSpec:
    name: str
    data: str = ""  # .tsv / .jsonl path; "" for synth tasks (generated) and VLMEvalKit names (looked up)
    prompt: str = "{question}"
    parser: str = "text"  # a PARSERS key
    metric: str = "exact_match"  # a METRICS key
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    version: str = "1"
    circular: bool = False  # multiple choice: ask every rotation of the options, right only if all are
    select: str | None = None  # keep only items of this category (synth: the ability)
    description: str = ""

    def __post_init__(self):
        if self.parser not in PARSERS:
            raise ValueError(f"task {self.name!r}: unknown parser {self.parser!r}; known: {sorted(PARSERS)}")
        if self.metric not in METRICS:
            raise ValueError(f"task {self.name!r}: unknown metric {self.metric!r}; known: {sorted(METRICS)}")
        if isinstance(self.generation, dict):
            self.generation = GenerationSettings(**self.generation)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TaskSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TaskSpec fields {unknown}; known: {sorted(names)}")
        return cls(**d)


# --------------------------------------------------------------------------------- parsers / metrics
def _parse_text(text: str, item: EvalItem) -> str | None:
    return text


def _parse_choice(text: str, item: EvalItem) -> str | None:
    return M.extract_choice(text, item.options)


def _parse_boxed(text: str, item: EvalItem) -> str | None:
    return M.extract_boxed(text)


def _parse_boxed_or_text(text: str, item: EvalItem) -> str | None:
    return parse_thinking(text)[1]  # the demo's rule for thinking tasks: the last box, else the reply's end


# parser(text, item) -> the answer, or None when rules cannot extract one (a judge may then be asked)
PARSERS: dict[str, Callable[[str, EvalItem], str | None]] = {
    "text": _parse_text, "choice": _parse_choice, "boxed": _parse_boxed, "boxed_or_text": _parse_boxed_or_text}


def _best(fn):
    return lambda pred, item: max(float(fn(pred, a)) for a in item.answers)


# metric(answer, item) -> score in [0, 1]
METRICS: dict[str, Callable[[str, EvalItem], float]] = {
    "vqa_accuracy": lambda pred, item: M.vqa_accuracy(pred, item.answers),
    "anls": lambda pred, item: M.anls(pred, item.answers),
    "relaxed_accuracy": lambda pred, item: M.relaxed_accuracy(pred, item.answers),
    "ocrbench": lambda pred, item: float(M.ocrbench_hit(pred, item.answers, item.category or "")),
    "accuracy": lambda pred, item: M.accuracy(pred, item.answers),
    "choice": lambda pred, item: float(pred == item.answers[0].strip()),
    "exact_match": _best(M.exact_match),
    "numeric": _best(M.numeric_match),
    "grounding": _best(M.grounding_hit),
    "token_f1": _best(M.token_f1),
}


def parse_answer(spec: TaskSpec, raw: str, item: EvalItem, think: bool) -> str | None:
    """The answer a reply gives by the task's rules. In thinking mode, or when the reply thinks anyway, the reply's
    final part (the last \\boxed{}, else the text after </think>) is what the parser reads."""
    thinks = think or THINK_END in raw
    text = parse_thinking(raw)[1] if thinks and spec.parser not in ("boxed", "boxed_or_text") else raw
    return PARSERS[spec.parser](text, item)


def score(spec: TaskSpec, answer: str | None, item: EvalItem) -> float:
    """0.0 for no answer, else the task's metric."""
    return 0.0 if answer is None else float(METRICS[spec.metric](answer, item))


# ----------------------------------------------------------------------------------------- prompts
def _fill(template: str, fields: dict[str, str]) -> str:
    out = template
    for k, v in fields.items():  # str.replace, not str.format: questions contain braces
        out = out.replace("{" + k + "}", v)
    return out


def build_prompt(spec: TaskSpec, item: EvalItem, think: bool = False) -> str:
    """The user turn: `<image>` placeholders, the filled template, the thinking suffix in thinking mode."""
    options = "".join(f"\n{k}. {v}" for k, v in item.options.items())
    text = _fill(spec.prompt, {"question": item.question, "options": options,
                               "hint": f"{item.hint}\n" if item.hint else ""})
    placed = [text] + [m["content"] for m in item.history]
    if not any(IMAGE_PLACEHOLDER in t or VIDEO_PLACEHOLDER in t for t in placed):
        video = "" if item.video is None else VIDEO_PLACEHOLDER + "\n"
        text = (IMAGE_PLACEHOLDER + "\n") * len(item.images) + video + text
    if think and not text.endswith(THINK_SUFFIX):
        text += THINK_SUFFIX
    return text


# ------------------------------------------------------------------------------------- the registry
def synth_spec(ability: str, data: str = "") -> TaskSpec:
    """One ability of the synthetic world: its scorer is the demo's (sailvl.eval.synth)."""
    if ability in SYNTH_THINKING_TASKS:
        parser, metric, gen = "boxed_or_text", "exact_match", GenerationSettings(160, 160)
    elif ability == "grounding":
        parser, metric, gen = "text", "grounding", GenerationSettings(32, 160)
    elif ability in SYNTH_CAPTION_TASKS:
        parser, metric, gen = "text", "token_f1", GenerationSettings(32, 160)
    else:
        parser, metric, gen = "text", "exact_match", GenerationSettings(32, 160)
    return TaskSpec(name=f"synth/{ability}", data=data, parser=parser, metric=metric, generation=gen,
                    select=ability, description=f"synthetic world test split, {ability}")


VLMEVAL_TASKS: dict[str, dict] = {
    "MMStar": {"prompt": CHOICE_PROMPT, "parser": "choice", "metric": "choice",
               "description": "MMStar multiple choice; VLMEvalKit can_infer letter extraction"},
    "OCRBench": {"prompt": SHORT_PROMPT, "metric": "ocrbench", "description": "OCRBench substring hits"},
    "ChartQA_TEST": {"prompt": SHORT_PROMPT, "metric": "relaxed_accuracy", "description": "ChartQA relaxed accuracy"},
    "DocVQA_VAL": {"prompt": SHORT_PROMPT, "metric": "anls", "description": "DocVQA ANLS"},
    "TextVQA_VAL": {"prompt": SHORT_PROMPT, "metric": "vqa_accuracy", "description": "TextVQA VQA accuracy"},
}
# VLMEvalKit picks the metric by a substring of the dataset name (`listinstr`); so do we for other TSVs.
_TSV_NAME_RULES = [("TextVQA", "vqa_accuracy"), ("ChartQA", "relaxed_accuracy"), ("OCRVQA", "accuracy"),
                   ("GQA", "accuracy"), ("DocVQA", "anls"), ("InfoVQA", "anls"), ("OCRBench", "ocrbench")]


def _synth_abilities() -> list[str]:
    from ..data.synth import TASKS

    return list(TASKS)


def known_tasks() -> list[str]:
    return ["synth", *(f"synth/{a}" for a in _synth_abilities()), *VLMEVAL_TASKS]


def lmu_data_root() -> Path:
    """VLMEvalKit's data directory: $LMUData, else ~/LMUData."""
    return Path(os.environ.get("LMUData") or Path.home() / "LMUData")


def _tsv_spec(name: str, path: str, columns_have_options: bool) -> TaskSpec:
    if name in VLMEVAL_TASKS:
        return TaskSpec(name=name, data=path, **VLMEVAL_TASKS[name])
    for key, metric in _TSV_NAME_RULES:
        if key in name:
            return TaskSpec(name=name, data=path, prompt=SHORT_PROMPT, metric=metric)
    if columns_have_options:
        return TaskSpec(name=name, data=path, prompt=CHOICE_PROMPT, parser="choice", metric="choice")
    return TaskSpec(name=name, data=path, prompt=SHORT_PROMPT, metric="accuracy")


def _tsv_has_options(path: Path) -> bool:
    with open(path, encoding="utf-8-sig") as f:
        header = f.readline().rstrip("\r\n").split("\t")
    return "A" in header and "B" in header


def resolve_tasks(name_or_path: str, data: str | None = None, metric: str | None = None) -> list[TaskSpec]:
    """Task specs for a built-in name or a data / spec file. `data` overrides where the data is; `metric`
    overrides the metric. Raises ValueError for an unknown name (with suggestions) or a missing file."""
    specs = _resolve(name_or_path, data)
    if metric is not None:
        specs = [dataclasses.replace(s, metric=metric) for s in specs]
    return specs


def _resolve(name: str, data: str | None) -> list[TaskSpec]:
    if name == "synth":
        return [synth_spec(a, data or "") for a in _synth_abilities()]
    if name.startswith("synth/"):
        ability = name.split("/", 1)[1]
        if ability not in _synth_abilities():
            raise ValueError(f"unknown synthetic ability {ability!r}; known: {_synth_abilities()}")
        return [synth_spec(ability, data or "")]
    if name in VLMEVAL_TASKS:
        path = Path(data) if data else lmu_data_root() / f"{name}.tsv"
        if not path.is_file():
            raise FileNotFoundError(f"{name}: {path} not found; pass --data /path/to/{name}.tsv (the VLMEvalKit "
                                    f"TSV) or put it under $LMUData")
        return [TaskSpec(name=name, data=str(path), **VLMEVAL_TASKS[name])]
    path = Path(name)
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".jsonl", ".json"):
        if not path.is_file():
            raise FileNotFoundError(f"no such task file: {path}")
        if suffix == ".tsv":
            return [_tsv_spec(path.stem, str(path), _tsv_has_options(path))]
        if suffix == ".json":
            return [_spec_file(path, data)]
        return _jsonl_specs(path)
    close = difflib.get_close_matches(name, known_tasks(), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown task {name!r}{hint} Known: synth, synth/<ability>, {', '.join(VLMEVAL_TASKS)}, "
                     f"or a .tsv / .jsonl / .json file")


def _spec_file(path: Path, data: str | None) -> TaskSpec:
    try:
        spec = TaskSpec.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if data:
        spec.data = data
    elif spec.data and not Path(spec.data).is_absolute():
        spec.data = str(path.parent / spec.data)
    return spec


def _jsonl_specs(path: Path) -> list[TaskSpec]:
    """A synthetic-world split (records with a `task` field) becomes one spec per ability; any other
    question file one spec (multiple choice when its items have options)."""
    items, _ = read_jsonl_items(path)
    abilities = set(_synth_abilities())
    cats = sorted({it.category for it in items if it.category})
    if cats and all(c in abilities for c in cats) and all(it.category for it in items):
        return [synth_spec(c, str(path)) for c in cats]
    if any(it.options for it in items):
        return [TaskSpec(name=path.stem, data=str(path), prompt=CHOICE_PROMPT, parser="choice", metric="choice")]
    return [TaskSpec(name=path.stem, data=str(path))]


# ------------------------------------------------------------------------------------------- data
def load_items(spec: TaskSpec, work_dir: str | Path | None = None,
               limit: int | None = None) -> tuple[list[EvalItem], list[dict]]:
    """The spec's items (after `select`, the first `limit` of them, then circular expansion) and skipped
    rows. Synthetic tasks without data generate the test split under work_dir/synth-data (fixed seed,
    reused when present)."""
    data = spec.data
    if not data and spec.name.startswith("synth/"):
        data = str(ensure_synth_data(Path(work_dir or ".") / "synth-data"))
    if not data:
        raise ValueError(f"task {spec.name!r} has no data path")
    path = Path(data)
    if path.suffix.lower() == ".tsv":
        items, skipped = read_vlmeval_tsv(path)
    else:
        items, skipped = read_jsonl_items(path)
    if spec.select is not None:
        items = [it for it in items if it.category == spec.select]
        if not items:
            raise ValueError(f"{path}: no items of category {spec.select!r} (task {spec.name})")
    if limit is not None:
        items = items[:limit]
    if spec.circular:
        items = [v for it in items for v in circular_items(it)]
    return items, skipped


def circular_items(item: EvalItem) -> list[EvalItem]:
    """One item per rotation of the options (ids "<id>@<k>", meta["circular_of"] = the original id)."""
    if not item.options:
        raise ValueError(f"item {item.id!r}: circular evaluation needs options")
    out = []
    for k, (opts, ans) in enumerate(M.circular_variants(item.options, item.answers[0].strip())):
        out.append(dataclasses.replace(item, id=f"{item.id}@{k}", options=opts, answers=[ans],
                                       meta={**item.meta, "circular_of": item.id}))
    return out


def ensure_synth_data(out_dir: Path, n_per_task: int | None = None, seed: int = 0) -> Path:
    """out_dir/test.jsonl: the synthetic test split (SYNTH_ITEMS_PER_TASK per ability), written once (same
    seed -> the same file). It is drawn like `generate_splits`' test split but without its redraws against
    a training split: for a held-out score pass the test.jsonl of the split the model trained with."""
    from ..data.synth import generate

    jsonl = out_dir / "test.jsonl"
    if not jsonl.exists():
        n = n_per_task if n_per_task is not None else SYNTH_ITEMS_PER_TASK
        generate(out_dir, n * len(_synth_abilities()), seed=seed, split="test")
    return jsonl
