"""The record every source yields and every later stage consumes, and the one way to reject a record.

A `Sample` is a conversation plus its visual inputs, still undecoded:
  - `messages`: [{"role": "system" | "user" | "assistant", "content": str}, ...]. User text may hold
    `<image>` placeholders (one per entry of `images`, in order) and at most one `<video>` placeholder.
    Assistant text may start with a `<think>...</think>` block (thinking samples); the final answer of
    reasoning samples is in the last `\\boxed{...}`.
  - `images`: one entry per `<image>`: a path (str / Path, resolved against the source's image root),
    raw encoded bytes, or a PIL image.
  - `video`: a video file path, a folder of frames, or a list of frame entries (as for images).
  - `task` / `answer`: the task name and the verifiable answer, when the record has them (synthetic
    data, eval sets), so a scorer can check a prediction exactly.
  - `text` (and `prompt`): instead of messages, plain text with no chat template: a document trained on every
    token (LLM pretraining text), or with `prompt` an untrained context before the trained `text` (a
    prompt-completion pair); such a sample has no messages, images or video.
  - `source` / `key`: where the record came from (source name; line number, tar key or parquet row)
    so a skipped record can be reported precisely.

Anything that finds a record unusable (malformed JSON, missing image, decompression bomb, no assistant
turn, too long, ...) raises `SkipSample(reason)`; the loader catches it, counts it and writes it to
`skipped.jsonl`. Nothing is dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from PIL import Image

ImageRef = Union[str, Path, bytes, Image.Image]
IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
ROLES = ("system", "user", "assistant")


class SkipSample(Exception):
    """A record that cannot be used; `reason` is a short, stable, human-readable phrase."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Sample:
    messages: list[dict[str, str]]
    images: list[ImageRef] = field(default_factory=list)
    video: ImageRef | list[ImageRef] | None = None
    task: str | None = None
    answer: str | None = None
    source: str = ""
    key: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    text: str | None = None
    prompt: str | None = None

    def validate(self) -> Sample:
        """Structural checks every source applies; raises SkipSample naming the problem."""
        if self.text is not None or self.prompt is not None:
            if not isinstance(self.text, str) or not self.text.strip():
                raise SkipSample("a text sample needs a non-empty text (completion)")
            if self.prompt is not None and not isinstance(self.prompt, str):
                raise SkipSample(f"a text sample's prompt must be a string, not {type(self.prompt).__name__}")
            if self.messages or self.images or self.video is not None:
                raise SkipSample("a text sample cannot also carry messages, images or video")
            return self
        if not self.messages:
            raise SkipSample("no messages")
        for m in self.messages:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise SkipSample(f"malformed message {str(m)[:80]!r}")
        if not any(m["role"] == "assistant" for m in self.messages):
            raise SkipSample("no assistant turn")
        n_img = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in self.messages if m["role"] == "user")
        if n_img != len(self.images):
            raise SkipSample(f"{n_img} <image> placeholders but {len(self.images)} images")
        n_vid = sum(m["content"].count(VIDEO_PLACEHOLDER) for m in self.messages if m["role"] == "user")
        if n_vid != (self.video is not None) or n_vid > 1:
            raise SkipSample(f"{n_vid} <video> placeholders but {'a' if self.video is not None else 'no'} video")
        return self
