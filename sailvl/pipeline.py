"""`sailvl.load(dir)`: a model directory (weights + processor) ready to talk to."""

from __future__ import annotations

from pathlib import Path

from .data.processor import Processor
from .model.generate import GenerationConfig, generate
from .model.vlm import SailVL


class Pipeline:
    def __init__(self, model: SailVL, processor: Processor):
        self.model, self.processor = model, processor

    def chat(self, images=None, question: str = "", thinking: bool = False, system: str | None = None,
             video=None, return_thinking: bool = False, **gen):
        """Answer `question` about `images` (a PIL image, a path, bytes, or a list of them) and/or a video.
        The images go before the question unless it places them itself with `<image>` / `<video>` placeholders.
        With thinking=True the prompt asks for reasoning in <think> and a \\boxed{} answer; the boxed answer
        is returned (and the thinking too when return_thinking=True)."""
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        if "<image>" in question or "<video>" in question:  # the question places its images itself
            placeholders = ""
        else:
            placeholders = "<image>\n" * len(images) + ("<video>\n" if video is not None else "")
        messages = [{"role": "user", "content": placeholders + question}]
        inputs = self.processor(messages, images, video, thinking=thinking, add_generation_prompt=True, system=system)
        pixels = inputs["pixel_values"]
        if pixels is not None:
            m = self.model
            pixels = [p.to(m.device, m.dtype) for p in pixels] if isinstance(pixels, list) else pixels.to(m.device, m.dtype)
        gen.setdefault("max_new_tokens", 4096 if thinking else 1024)
        cfg = GenerationConfig(**gen)
        cfg.stop_token_ids = [*cfg.stop_token_ids, self.processor.im_end_id]
        decode = lambda ids: self.processor.decode(ids, skip_special_tokens=False)  # noqa: E731
        text = generate(self.model, [inputs["input_ids"].tolist()], cfg, pixel_values=pixels, decode=decode).texts[0]
        if not thinking:
            return text
        thought, answer = self.processor.parse_thinking(text)
        return (thought, answer) if return_thinking else answer


def load(path: str | Path, dtype=None, device=None) -> Pipeline:
    """Load a SAIL-VL2 model directory (weights + tokenizer [+ preprocessor_config.json]) for chatting."""
    model = SailVL.from_pretrained(path, dtype=dtype, device=device)
    return Pipeline(model, Processor.from_pretrained(path))
