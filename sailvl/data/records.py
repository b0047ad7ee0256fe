"""Parsing of conversation records into `Sample`s: one parser for LLaVA / InternVL records
(`conversations` of {"from", "value"}, `image` / `images` / `video`) and OpenAI chat records (`messages` of
{"role", "content"}, content a string or typed parts: image parts become `<image>` where they stand,
`data:` URIs are decoded to bytes), plus optional top-level `images`, `task`, `answer`, `id`; and plain-text
records with no turns and no media: `{"text": ...}` (a document, trained on every token) or `{"prompt": ...,
"completion": ...}` (trained on the completion only).
InternVL convention: images (a video) without any `<image>` (`<video>`) in the user text get `<image>\n`
per image (`<video>\n`) prepended to the first user turn. Any unexpected shape is `SkipSample`.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from collections.abc import Callable, Iterable
from typing import Any

from sailvl.data.focus import parse_focus
from sailvl.data.schema import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, ImageRef, Sample, SkipSample

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
          "developer": "system"}
Lookup = Callable[[str, str], ImageRef]  # (relative name, "image" | "video") -> reference, or SkipSample


def parse_record(rec: Any, lookup: Lookup, default_images: Iterable[Any] = ()) -> Sample:
    """Turn one JSON record (LLaVA or OpenAI form) into an unvalidated Sample.

    `lookup` resolves a plain name (path, member name) to an image reference; `default_images` are used
    when the record names no image at all (WebDataset groups whose json does not reference its images)."""
    if not isinstance(rec, dict):
        raise SkipSample(f"malformed record: a JSON {type(rec).__name__}, not an object")
    turns = rec.get("messages", rec.get("conversations"))
    meta = {"id": rec["id"]} if rec.get("id") is not None else {}
    if turns is not None and ("text" in rec or "completion" in rec):
        raise SkipSample("malformed record: both turns and plain text ('text' / 'completion')")
    if turns is None and ("text" in rec or "completion" in rec):
        key = "text" if "text" in rec else "completion"
        prompt = rec.get("prompt") if key == "completion" else None
        for name, value in ((key, rec[key]), ("prompt", prompt)):
            if value is not None and not isinstance(value, str):
                raise SkipSample(f"malformed record: {name!r} is a {type(value).__name__}, not a string")
        if key == "completion" and prompt is None:
            raise SkipSample("malformed record: a 'completion' without its 'prompt'")
        if any(rec.get(k) is not None for k in ("image", "images", "video")):
            raise SkipSample("malformed record: a text record cannot carry images or video")
        return Sample([], task=_opt_str(rec.get("task")), answer=_opt_str(rec.get("answer")), meta=meta,
                      text=rec[key], prompt=prompt)
    if turns is None:
        raise SkipSample("malformed record: no 'conversations', 'messages', 'text' or 'completion'")
    media = _Media(lookup)
    messages = _messages(turns, media)
    top = as_list(rec.get("image")) + as_list(rec.get("images"))
    _fill_images(media, top)
    _fill_video(media, rec.get("video"))
    if not media.images and not top and media.video is None:
        media.images = [resolve_ref(r, "image", lookup) for r in default_images]
    _add_placeholders(messages, len(media.images), media.video is not None)
    if rec.get("focus") is not None:
        try:
            meta["focus"] = parse_focus(rec["focus"])
        except ValueError as e:
            raise SkipSample(f"malformed record: {e}") from None
    return Sample(messages, media.images, media.video, task=_opt_str(rec.get("task")),
                  answer=_opt_str(rec.get("answer")), meta=meta)


class _Media:
    """Images and video collected while parsing a record's turns; `None` / `_SLOT` stand for media parts
    without a reference ({"type": "image"}), filled from the record's top-level images / video."""

    def __init__(self, lookup: Lookup):
        self.lookup, self.images, self.video = lookup, [], None


_SLOT = "<unreferenced video part>"


def _fill_images(media: _Media, top: list) -> None:
    slots = sum(x is None for x in media.images)
    if slots and slots != len(top):
        raise SkipSample(f"{slots} image parts without a reference but {len(top)} top-level images")
    if not slots and top and media.images:
        raise SkipSample("malformed record: images both inline and top-level")
    refs = iter(top)
    media.images = [resolve_ref(next(refs), "image", media.lookup) if x is None else x for x in media.images]
    media.images += [resolve_ref(r, "image", media.lookup) for r in refs]


def _fill_video(media: _Media, top: Any) -> None:
    has_top = top not in (None, "", [])
    if media.video is _SLOT and not has_top:
        raise SkipSample("a video part without a reference and no top-level video")
    if has_top and media.video is not None and media.video is not _SLOT:
        raise SkipSample("malformed record: video both inline and top-level")
    if has_top:
        media.video = _video(top, media.lookup)


def _messages(turns: Any, media: _Media) -> list[dict[str, str]]:
    if not isinstance(turns, list):
        raise SkipSample(f"malformed record: conversation is a {type(turns).__name__}, not a list")
    out = []
    for t in turns:
        if not isinstance(t, dict):
            raise SkipSample(f"malformed turn {str(t)[:80]!r}")
        who = t.get("role") if t.get("role") is not None else t.get("from")
        role = _ROLES.get(who) if isinstance(who, str) else None
        if role is None:
            raise SkipSample(f"unknown role {who!r}")
        content = t["content"] if t.get("content") is not None else t.get("value")
        out.append({"role": role, "content": _content(content, media)})
    return out


def _content(content: Any, media: _Media) -> str:
    """A turn's text; OpenAI typed parts are joined with newlines, media parts become placeholders."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise SkipSample(f"malformed turn: content is {type(content).__name__}")
    pieces = []
    for part in content:
        if isinstance(part, str):
            pieces.append(part)
        elif not isinstance(part, dict):
            raise SkipSample(f"malformed content part {str(part)[:80]!r}")
        elif part.get("type") in ("text", "input_text") or (part.get("type") is None and "text" in part):
            if not isinstance(part.get("text"), str):
                raise SkipSample("malformed content part: text is not a string")
            pieces.append(part["text"])
        elif part.get("type") in ("image_url", "image", "input_image"):
            ref = _part_ref(part)
            media.images.append(None if ref is None else resolve_ref(ref, "image", media.lookup))
            pieces.append(IMAGE_PLACEHOLDER)
        elif part.get("type") in ("video", "video_url"):
            if media.video is not None:
                raise SkipSample("more than one video")
            ref = _part_ref(part)
            media.video = _SLOT if ref is None else _video(ref, media.lookup)
            pieces.append(VIDEO_PLACEHOLDER)
        else:
            raise SkipSample(f"unknown content part type {part.get('type')!r}")
    return "\n".join(pieces)


def _part_ref(part: dict) -> Any:
    """The reference in an OpenAI media part ({"image_url": {"url": ...}}, {"image": ...}, ...) or None."""
    for k in (part.get("type"), "image_url", "image", "video_url", "video", "url", "path"):
        v = part.get(k) if isinstance(k, str) else None
        if isinstance(v, dict):  # {"url": ...} or an HF {"bytes", "path"} struct
            if v.get("url") is not None:
                return v["url"]
            if v.get("bytes") or v.get("path"):
                return v
        elif v is not None:
            return v
    return None  # a bare {"type": "image"}: the record's top-level images fill it


def _video(ref: Any, lookup: Lookup) -> ImageRef | list[ImageRef]:
    if isinstance(ref, list):
        if not ref:
            raise SkipSample("empty video frame list")
        return [resolve_ref(f, "image", lookup) for f in ref]
    return resolve_ref(ref, "video", lookup)


def _add_placeholders(messages: list[dict[str, str]], n_images: int, has_video: bool) -> None:
    users = [m for m in messages if m["role"] == "user"]
    if not users:
        return  # validate() reports the mismatch
    prefix = ""
    if n_images and not any(IMAGE_PLACEHOLDER in m["content"] for m in users):
        prefix += f"{IMAGE_PLACEHOLDER}\n" * n_images
    if has_video and not any(VIDEO_PLACEHOLDER in m["content"] for m in users):
        prefix += f"{VIDEO_PLACEHOLDER}\n"
    users[0]["content"] = prefix + users[0]["content"]


def as_list(v: Any) -> list:
    if v is None or (isinstance(v, (str, bytes)) and not v):
        return []
    return [x for x in v if x is not None] if isinstance(v, (list, tuple)) else [v]


def _opt_str(v: Any) -> str | None:
    if v is None or isinstance(v, str):
        return v
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def resolve_ref(ref: Any, kind: str, lookup: Lookup) -> ImageRef:
    """bytes / {"bytes", "path"} structs / data: URIs are handled here; names go to the source's lookup."""
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return bytes(ref)
    if isinstance(ref, dict):  # the HF datasets Image struct
        if ref.get("bytes"):
            return bytes(ref["bytes"])
        ref = ref.get("path")
    if isinstance(ref, Path):
        ref = str(ref)
    if not isinstance(ref, str) or not ref:
        raise SkipSample(f"bad {kind} reference {str(ref)[:80]!r}")
    if ref.startswith("data:"):
        return decode_data_uri(ref)
    if ref.startswith(("http://", "https://")):
        raise SkipSample(f"remote {kind} not supported: {ref[:200]}")
    return lookup(ref.removeprefix("file://"), kind)


def decode_data_uri(uri: str) -> bytes:
    head, comma, data = uri.partition(",")
    if not comma or not head.endswith(";base64"):
        raise SkipSample("bad data URI: not base64")
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise SkipSample(f"bad data URI: {e}") from None
    if not raw:
        raise SkipSample("bad data URI: empty")
    return raw
