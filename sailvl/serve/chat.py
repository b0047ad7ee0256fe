"""`sailvl chat` and `sailvl caption` as library functions over an `Engine`.

  - ChatSession: a conversation with history, images attached to the next question, a video, thinking mode
    per turn; answers stream to a text stream as they are generated. `interactive` adds the commands
    /image PATH, /reset, /think on|off, /quit.
  - caption_folder: every image under a folder -> one JSONL line each, several in flight through the
    engine's batching; resumable (images already captioned in the output are skipped); a bad image is
    reported (a line with "error") and the run goes on.
"""

from __future__ import annotations

import json
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from ..data.image import ImageError, load_image
from ..data.schema import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, SkipSample
from ..data.template import THINK_END
from ..train.progress import Progress
from .engine import Choice, Engine
from .sampling import SamplingParams

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
DEFAULT_CAPTION_PROMPT = "Describe this image in detail."
HELP = "commands: /image PATH (attach to the next question), /reset, /think on|off, /quit"


class ChatSession:
    """A multi-turn conversation. Images attached with `attach` go with the next question."""

    def __init__(self, engine: Engine, params: SamplingParams | None = None, *, thinking: bool = False,
                 system: str | None = None, video=None):
        self.engine, self.params, self.thinking, self.system = engine, params or SamplingParams(), thinking, system
        self.video = video
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = []
        self.images: list = []  # every image of the conversation, in order
        self.pending: list = []  # attached, not yet asked about

    def attach(self, image) -> None:
        """Attach an image (path, bytes or PIL image) to the next question; a bad image raises ImageError now."""
        load_image(image)
        self.pending.append(image)

    def ask(self, question: str, out: TextIO | None = None) -> Choice:
        """Ask, streaming the reply to `out`; the reply (thinking removed) joins the history."""
        head = IMAGE_PLACEHOLDER + "\n"
        text = head * len(self.pending) + question
        if self.video is not None and not self.messages:
            text = VIDEO_PLACEHOLDER + "\n" + text
        messages = self.messages + [{"role": "user", "content": text}]
        images = self.images + self.pending
        # the video's placeholder stays in the first turn, so the video goes with every prompt
        prompt = self.engine.prepare(messages, images, self.video, thinking=self.thinking, system=self.system)
        handle = self.engine.submit(prompt, self.params)
        for ev in handle:
            if out is not None and ev.text:
                out.write(ev.text)
                out.flush()
        choice = handle.result().choices[0]
        reply = choice.text.split(THINK_END, 1)[1].strip() if THINK_END in choice.text else choice.text
        self.messages = messages + [{"role": "assistant", "content": reply}]
        self.images, self.pending = images, []
        return choice


def interactive(session: ChatSession, read: Callable[[str], str] = input, out: TextIO | None = None) -> None:
    """A read-eval-print loop over `session` until /quit or end of input (`out` defaults to stdout)."""
    out = out if out is not None else sys.stdout
    out.write(HELP + "\n")
    while True:
        try:
            line = read("> ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            session.reset()
            out.write("(conversation cleared)\n")
        elif line.startswith("/image"):
            path = line[len("/image"):].strip()
            try:
                session.attach(path)
                out.write(f"(attached {path})\n")
            except ImageError as e:
                out.write(f"(cannot use that image: {e})\n")
        elif line.startswith("/think"):
            arg = line[len("/think"):].strip()
            if arg not in ("on", "off"):
                out.write("(usage: /think on|off)\n")
                continue
            session.thinking = arg == "on"
            out.write(f"(thinking {arg})\n")
        elif line.startswith("/"):
            out.write(f"(unknown command; {HELP})\n")
        else:
            try:
                choice = session.ask(line, out)
            except (ValueError, SkipSample) as e:
                out.write(f"(error: {e})\n")
                continue
            out.write("\n")
            if session.thinking and choice.answer is not None:
                out.write(f"[answer] {choice.answer}\n")


def image_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {folder}")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def captioned(out_path: Path) -> set[str]:
    """Images that already have a caption in the output (a torn last line from a kill is ignored)."""
    done = set()
    if out_path.exists():
        for line in out_path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "caption" in rec and "image" in rec:
                done.add(rec["image"])
    return done


def caption_folder(engine: Engine, images_dir: str | Path, out_path: str | Path, prompt: str = DEFAULT_CAPTION_PROMPT,
                   params: SamplingParams | None = None, in_flight: int = 8, progress: bool = True) -> dict:
    """Caption every image under `images_dir` into JSONL lines {"image": relative path, "caption", ...}.
    The engine must be running (`engine.start()`). Returns {"captioned", "skipped", "failed": [(image, why)]}."""
    root, out_path = Path(images_dir), Path(out_path)
    files = image_files(root)
    done = captioned(out_path)
    todo = [p for p in files if p.relative_to(root).as_posix() not in done]
    summary = {"captioned": 0, "skipped": len(files) - len(todo), "failed": [], "out": str(out_path)}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if out_path.exists() and out_path.stat().st_size and not out_path.read_bytes().endswith(b"\n"):
        with open(out_path, "a", encoding="utf-8") as f:  # a torn last line: start a fresh one
            f.write("\n")
    bar = Progress(len(todo), "caption", every=max(1, len(todo) // 20), enabled=progress)
    messages = [{"role": "user", "content": IMAGE_PLACEHOLDER + "\n" + prompt}]
    window: deque = deque()
    finished = 0
    with open(out_path, "a", encoding="utf-8") as f:
        def write(rec: dict) -> None:
            nonlocal finished
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            finished += 1
            bar.update(finished, failed=len(summary["failed"]))

        def fail(key: str, why: str) -> None:
            summary["failed"].append((key, why))
            print(f"caption: skipping {key}: {why}", file=sys.stderr)
            write({"image": key, "error": why})

        def collect() -> None:
            key, handle = window.popleft()
            try:
                out = handle.result()
            except ValueError as e:
                fail(key, str(e))
                return
            c = out.choices[0]
            summary["captioned"] += 1
            write({"image": key, "caption": c.text, "finish_reason": c.finish_reason,
                   "prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens})

        for path in todo:
            key = path.relative_to(root).as_posix()
            try:
                p = engine.prepare(messages, [path])
                handle = engine.submit(p, params)
            except (ImageError, SkipSample, ValueError) as e:
                fail(key, str(e))
                continue
            window.append((key, handle))
            if len(window) >= in_flight:
                collect()
        while window:
            collect()
    return summary
