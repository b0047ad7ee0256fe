"""Evaluation items and our JSONL question files.

An `EvalItem` is one question: text, images (bytes / paths / PIL images, in prompt order) or a video,
ground-truth answers, and for multiple choice the options A..Z. Readers turn data files into items and a
list of skipped rows with reasons (nothing is dropped silently):

  - `read_jsonl_items`: our question files, one JSON object per line:
        {"id": "q1", "question": "What is written?", "image": "img/1.png",       # or "images": [...]
         "answer": "STOP",                                                      # or a list of answers
         "options": {"A": "...", "B": "..."}, "category": "ocr", "hint": "..."}  # optional
    Image entries are paths relative to the file or `data:image/...;base64,` URIs. Files of conversation
    records (LLaVA `conversations` / OpenAI `messages` with a top-level `answer`, e.g. the synthetic
    world's test.jsonl) are read too: the first user turn is the question, `task` the category.
  - VLMEvalKit TSV files: see `tsv.py`.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.schema import SkipSample


@dataclass
class EvalItem:
    id: str
    question: str
    answers: list[str]
    images: list[Any] = field(default_factory=list)
    video: Any = None
    options: dict[str, str] = field(default_factory=dict)
    category: str | None = None
    hint: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # earlier turns of a multi-turn item ({"role", "content"} with the placeholders); `question` is the last
    # user turn and the media belong to the placeholders in these turns
    history: list[dict[str, str]] = field(default_factory=list)


def decode_data_uri(uri: str) -> bytes:
    """The bytes of a `data:[mime];base64,...` URI."""
    head, _, payload = uri.partition(",")
    if not head.startswith("data:") or not head.endswith(";base64"):
        raise ValueError(f"not a base64 data URI: {uri[:40]!r}")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"bad base64 in data URI: {e}") from None


def _image_ref(ref: Any, root: Path) -> Any:
    if not isinstance(ref, str) or not ref:
        raise SkipSample(f"image entries must be non-empty strings, got {ref!r}")
    if ref.startswith("data:"):
        try:
            return decode_data_uri(ref)
        except ValueError as e:
            raise SkipSample(str(e)) from None
    p = Path(ref) if Path(ref).is_absolute() else root / ref
    if not p.is_file():
        raise SkipSample(f"missing image: {p}")
    return str(p)


def _question_item(rec: dict, line: int, root: Path) -> EvalItem:
    if not isinstance(rec.get("question"), str):
        raise SkipSample("no 'question' string")
    answer = rec.get("answer", rec.get("answers"))
    answers = [str(a) for a in answer] if isinstance(answer, list) else ([] if answer is None else [str(answer)])
    if not answers:
        raise SkipSample("no 'answer'")
    images = rec.get("images", [rec["image"]] if rec.get("image") is not None else [])
    if not isinstance(images, list):
        raise SkipSample("'images' must be a list")
    options = rec.get("options") or {}
    if not isinstance(options, dict) or any(not (len(k) == 1 and "A" <= k <= "Z") for k in options):
        raise SkipSample(f"'options' must map letters A-Z to texts, got {options!r}")
    return EvalItem(id=str(rec.get("id", f"line{line}")), question=rec["question"], answers=answers,
                    images=[_image_ref(r, root) for r in images], options={k: str(v) for k, v in options.items()},
                    category=None if rec.get("category") is None else str(rec["category"]),
                    hint=rec.get("hint") or None)


def _record_items(path: Path) -> tuple[list[EvalItem], list[dict]]:
    from ..data.sources import JsonlSource

    src = JsonlSource(path)
    items, skipped = [], []
    for i in range(len(src)):
        try:
            s = src.read(i)
        except SkipSample as e:
            skipped.append({"id": src.key(i), "reason": e.reason})
            continue
        users = [k for k, m in enumerate(s.messages) if m["role"] == "user"]
        if not users:  # a plain-text record, or turns without a question
            skipped.append({"id": src.key(i), "reason": "no question (no user turn)"})
            continue
        # the item asks the last user turn; earlier turns (a multi-turn record) are its history
        last_user = users[-1]
        reply = next((m["content"] for m in s.messages[last_user:] if m["role"] == "assistant"), None)
        items.append(EvalItem(id=str(s.meta.get("id", s.key)), question=s.messages[last_user]["content"],
                              answers=[s.answer if s.answer is not None else reply], images=list(s.images),
                              video=s.video, category=s.task,
                              history=[dict(m) for m in s.messages[:last_user] if m["role"] != "system"]))
    return items, skipped


def read_jsonl_items(path: str | Path) -> tuple[list[EvalItem], list[dict]]:
    """Items of a JSONL question file (our format or conversation records) and the skipped lines
    [{"id", "reason"}]. Raises ValueError for a file with no usable line and for duplicate ids."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such JSONL file: {path}")
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    first = next((ln for ln in lines if ln.strip()), None)
    if first is None:
        raise ValueError(f"{path} is empty")
    try:
        head = json.loads(first)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the first line is not JSON ({e})") from None
    if isinstance(head, dict) and ("conversations" in head or "messages" in head):
        items, skipped = _record_items(path)
    else:
        items, skipped = [], []
        for n, ln in enumerate(lines, 1):
            if not ln.strip():
                continue
            try:
                rec = json.loads(ln)
                if not isinstance(rec, dict):
                    raise SkipSample(f"a JSON {type(rec).__name__}, not an object")
                items.append(_question_item(rec, n, path.parent))
            except json.JSONDecodeError as e:
                skipped.append({"id": f"line {n}", "reason": f"malformed JSON: {e}"})
            except SkipSample as e:
                skipped.append({"id": f"line {n}", "reason": e.reason})
    if not items:
        reasons = "; ".join(f"{s['id']}: {s['reason']}" for s in skipped[:3])
        raise ValueError(f"{path}: no usable question ({reasons})")
    check_unique_ids(items, path)
    return items, skipped


def check_unique_ids(items: list[EvalItem], source: Any) -> None:
    seen: set[str] = set()
    for it in items:
        if it.id in seen:
            raise ValueError(f"{source}: duplicate item id {it.id!r} (ids key the resumable results)")
        seen.add(it.id)
