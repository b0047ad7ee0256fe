"""The SAIL-VL2 chat template: ChatML with no newline between turns, image / video blocks, thinking mode,
the thinking-output parser, and the assistant-only loss spans (with the Think-Fusion rule).

    <|im_start|>system\n{sys}<|im_end|><|im_start|>user\n{q}<|im_end|><|im_start|>assistant\n{a}<|im_end|>

`<image>` becomes `<img>` + `<IMG_CONTEXT>` x n + `</img>\n` (n = tokens-per-tile x tiles); with several
images each block is prefixed `Image-k: `; a `<video>` becomes one block per frame prefixed `Frame-k: `
(or `Frame-k (t.ts): ` when timestamps are known).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from .schema import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
THINK_START, THINK_END = "<think>", "</think>"
THINK_SUFFIX = ("\nPlease reason step by step inside <think> </think> tags, "
                "then put the final answer in \\boxed{}.")
SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."
CHOICE_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
# The same ChatML as `render` for text (image blocks must already be expanded), for HF-style
# tokenizer_config.json consumers.
JINJA_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
                  "+ '<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
_EMPTY_THINK = re.compile(r"^\s*<think>\s*</think>\s*")


@dataclass
class Visuals:
    """Visual tokens per placeholder: one count per image, one per video frame (+ optional timestamps)."""

    image_tokens: list[int] = field(default_factory=list)
    frame_tokens: list[int] = field(default_factory=list)
    frame_times: list[float] | None = None


def image_block(n_tokens: int) -> str:
    return IMG_START + IMG_CONTEXT * n_tokens + IMG_END + "\n"


def _expand(text: str, images: list[int], n_images_total: int, first_index: int, visuals: Visuals) -> str:
    """Replace placeholders in one user message; a newline right after a placeholder is absorbed
    (the block ends with its own)."""
    out, pos, k = [], 0, first_index
    for m in re.finditer(re.escape(IMAGE_PLACEHOLDER) + r"\n?|" + re.escape(VIDEO_PLACEHOLDER) + r"\n?", text):
        out.append(text[pos:m.start()])
        if m.group().startswith(IMAGE_PLACEHOLDER):
            prefix = f"Image-{k + 1}: " if n_images_total > 1 else ""
            out.append(prefix + image_block(images[k]))
            k += 1
        else:
            for i, n in enumerate(visuals.frame_tokens):
                t = f" ({visuals.frame_times[i]:.1f}s)" if visuals.frame_times is not None else ""
                out.append(f"Frame-{i + 1}{t}: " + image_block(n))
        pos = m.end()
    out.append(text[pos:])
    return "".join(out)


def has_thinking(answer: str) -> bool:
    """A non-empty <think> block at the start of an assistant reply."""
    s = answer.lstrip()
    return s.startswith(THINK_START) and THINK_END in s and not _EMPTY_THINK.match(s)


def render(messages: Sequence[dict], visuals: Visuals | None = None, *, system: str | None = None,
           thinking: bool | None = None, add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation. Returns (text, trained character spans).

    thinking: True/False appends / omits the thinking suffix on the last user turn; None (training) adds it
    to each user turn whose reply has a thinking block. Loss spans cover each assistant reply and its
    <|im_end|>; an empty `<think></think>` prefix of a direct reply is excluded (Think-Fusion)."""
    visuals = visuals or Visuals()
    n_images = len(visuals.image_tokens)
    msgs = list(messages)
    if system is not None and not (msgs and msgs[0]["role"] == "system"):
        msgs.insert(0, {"role": "system", "content": system})
    last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=-1)
    parts, spans, length, img_index = [], [], 0, 0
    for i, m in enumerate(msgs):
        role, content = m["role"], m["content"]
        if role == "user":
            n_here = content.count(IMAGE_PLACEHOLDER)
            content = _expand(content, visuals.image_tokens, n_images, img_index, visuals)
            img_index += n_here
            nxt = msgs[i + 1]["content"] if i + 1 < len(msgs) and msgs[i + 1]["role"] == "assistant" else ""
            wants = (thinking is None and has_thinking(nxt)) or (thinking and i == last_user)
            if wants and not content.endswith(THINK_SUFFIX):  # data may already carry the instruction
                content += THINK_SUFFIX
        head = f"{IM_START}{role}\n"
        if role == "assistant":
            start = length + len(head)
            empty = _EMPTY_THINK.match(content)
            if empty:
                start += empty.end()
            piece = head + content + IM_END
            spans.append((start, length + len(piece)))
        else:
            piece = head + content + IM_END
        parts.append(piece)
        length += len(piece)
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts), spans


def parse_thinking(text: str) -> tuple[str | None, str]:
    """(thinking, answer) from a model output. Thinking is the text inside <think>...</think> (the opening
    tag may have been part of the prompt); the answer is the content of the last \\boxed{...} after it,
    or, without a box, the text after </think> stripped."""
    thinking, rest = None, text
    if THINK_END in text:
        head, rest = text.split(THINK_END, 1)
        thinking = head.split(THINK_START, 1)[1] if THINK_START in head else head
        thinking = thinking.strip()
    boxed = last_boxed(rest)
    return thinking, (boxed if boxed is not None else rest.strip())


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, with nested braces balanced; None when there is none."""
    start = text.rfind("\\boxed{")
    while start != -1:
        i, depth = start + len("\\boxed{"), 1
        j = i
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth == 0:
            return text[i:j - 1].strip()
        start = text.rfind("\\boxed{", 0, start)
    return None
