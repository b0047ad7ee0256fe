"""The in-memory record every task generator returns, and its conversion to a `Sample`.

A generator returns `(record, images)`. The record is the JSONL object without its id and file paths:

    {"task": "vqa_color", "answer": "red",
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the circle?\\nAnswer ..."},
                       {"from": "gpt", "value": "red"}],
     "meta": {...}}            # the world spec the answer is computed from (scene, text, chart, ...)

`images` holds one PIL image per `<image>` placeholder, or the frames of the one `<video>`
placeholder, or nothing for text-only records. `media_key` says which JSONL key the writer stores the
file paths under ("image", "images" or "video").
"""

from __future__ import annotations

from PIL import Image

from ..schema import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Sample
from ..template import THINK_SUFFIX


def make_record(task: str, prompt: str, answer: str, meta: dict, reply: str | None = None,
                n_images: int = 0, video: bool = False) -> dict:
    """A record whose human turn is the placeholders (one `<image>` per image, or one `<video>`) on
    their own lines, then `prompt`; the gpt turn is `reply` (default: the answer itself)."""
    head = VIDEO_PLACEHOLDER + "\n" if video else (IMAGE_PLACEHOLDER + "\n") * n_images
    return {
        "task": task,
        "answer": answer,
        "conversations": [{"from": "human", "value": head + prompt},
                          {"from": "gpt", "value": answer if reply is None else reply}],
        "meta": meta,
    }


# the tasks `add_scene_trace` gives a describe-then-answer thinking trace
TRACE_TASKS = ("vqa_color", "vqa_shape", "vqa_count", "vqa_spatial", "vqa_compare", "vqa_yesno", "grounding",
               "multi_change")


def add_scene_trace(record: dict, image_size: int) -> dict:
    """A TRACE_TASKS record asking for thinking, its reply describing the scene (the caption task's words; both
    scenes for multi_change) inside <think>, then "The answer is \\boxed{answer}." Other records are returned as
    they are."""
    if record["task"] not in TRACE_TASKS:
        return record
    from .scene import Obj, caption

    meta = record["meta"]
    if "scene" in meta:
        trace = caption([Obj.from_dict(o) for o in meta["scene"]], image_size)
    else:
        trace = "\n".join(f"{name}: " + caption([Obj.from_dict(o) for o in meta[key]], image_size)
                          for name, key in (("First", "before"), ("Second", "after")))
    human, gpt = record["conversations"]
    human["value"] += THINK_SUFFIX
    gpt["value"] = f"<think>\n{trace}\n</think>\n\nThe answer is \\boxed{{{record['answer']}}}."
    return record


def focus_objects(record: dict) -> list[int]:
    """Indices into `meta["scene"]` of the objects a single-question scene record's answer is about (the asked-about
    object; both objects of a relation or comparison; the counted objects; the object a yes / no question names,
    when there is one), [] for every other record."""
    meta, task = record["meta"], record["task"]
    scene = meta.get("scene") or []
    if task in ("vqa_color", "vqa_shape", "grounding"):
        return [meta["target"]]
    if task in ("vqa_spatial", "vqa_compare"):
        return [meta["a"], meta["b"]]
    if task == "vqa_count":
        flt = meta["count_filter"]
        return [i for i, o in enumerate(scene) if all(o[a] == v for a, v in flt.items())]
    if task == "vqa_yesno":
        if "a" in meta:
            return [meta["a"], meta["b"]]
        if "target" in meta:
            return [meta["target"]]
        return [i for i, o in enumerate(scene) if o["colour"] == meta.get("colour") and o["shape"] == meta.get("shape")]
    return []


def add_focus(record: dict, image_size: int) -> dict:
    """The record with `focus`: the 0-1000 boxes of `focus_objects` (sailvl.data.focus), when there are any."""
    from .scene import Obj, grounding_box

    objs = focus_objects(record)
    if objs:
        scene = record["meta"]["scene"]
        record["focus"] = [grounding_box(Obj.from_dict(scene[i]), image_size) for i in objs]
    return record


def place_media(record: dict, position: str) -> dict:
    """`record` with the placeholders heading its first human turn moved to the end of that turn ("last"; before
    a trailing thinking instruction) or left where they are ("first"). Later turns are never touched."""
    if position == "first":
        return record
    turn = record["conversations"][0]
    text, head = turn["value"], ""
    for ph in (IMAGE_PLACEHOLDER + "\n", VIDEO_PLACEHOLDER + "\n"):
        while text.startswith(ph):
            head, text = head + ph, text[len(ph):]
    if not head:
        return record
    tail = THINK_SUFFIX if text.endswith(THINK_SUFFIX) else ""
    body = text[:len(text) - len(tail)]
    turn["value"] = body + "\n" + head.rstrip("\n") + tail
    return record


TEXT_KEYS = ("text", "prompt", "completion")  # a plain-text record's: {"text"} or {"prompt", "completion"}


def is_text_record(record: dict) -> bool:
    """A plain-text record (no turns, no media): a document, or a prompt-completion pair."""
    return "text" in record or "completion" in record


def prompt_of(record: dict) -> str:
    """The first human turn; a plain-text record's whole text."""
    if is_text_record(record):
        return record.get("prompt", "") + record.get("completion", record.get("text", ""))
    return record["conversations"][0]["value"]


def media_key(record: dict, n_images: int) -> str | None:
    """Where the writer stores this record's files: "video", "image" (one), "images" (several) or None."""
    if VIDEO_PLACEHOLDER in prompt_of(record):
        return "video"
    if n_images == 0:
        return None
    return "image" if n_images == 1 else "images"


def to_sample(record: dict, images: list[Image.Image], key: str = "") -> Sample:
    """A validated `sailvl.data.schema.Sample` holding the PIL images in memory (for in-process
    training streams that skip the disk)."""
    if is_text_record(record):
        return Sample([], task=record["task"], answer=record["answer"], source="synth", key=key or record.get("id", ""),
                      meta=dict(record.get("meta", {})), text=record.get("completion", record.get("text")),
                      prompt=record.get("prompt")).validate()
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    messages = [{"role": roles[t["from"]], "content": t["value"]} for t in record["conversations"]]
    is_video = media_key(record, len(images)) == "video"
    return Sample(messages=messages, images=[] if is_video else list(images),
                  video=list(images) if is_video else None, task=record["task"], answer=record["answer"],
                  source="synth", key=key or record.get("id", ""), meta=dict(record.get("meta", {}))).validate()
