"""`sailvl.load(dir)`: a model directory ready to talk to.

Until the data issue's Processor lands, images are handled minimally: each image becomes one
`force_image_size` tile (no dynamic tiling, no thumbnail), with the SAIL-VL2 ChatML template and the
`<img><IMG_CONTEXT>...</img>` expansion.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data.tokenizer import load_tokenizer, token_id
from .model.generate import GenerationConfig, generate
from .model.vlm import SailVL

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
THINK_SUFFIX = (
    "\nPlease think step by step inside <think> </think> tags, then give the final answer in \\boxed{}."
)


def image_to_tile(image: Image.Image | str | Path, size: int) -> torch.Tensor:
    """RGB, bicubic resize to size x size, ImageNet normalisation -> [3, size, size] float32."""
    if not isinstance(image, Image.Image):
        try:
            with Image.open(image) as im:
                image = im.convert("RGB")
        except (OSError, Image.DecompressionBombError) as e:
            raise ValueError(f"cannot read image {image}: {e}") from None
    arr = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    arr = (arr - np.array(MEAN, dtype=np.float32)) / np.array(STD, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class Pipeline:
    def __init__(self, model: SailVL, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.im_end = token_id(tokenizer, "<|im_end|>")

    def build_prompt(self, question: str, n_images: int, thinking: bool, system: str | None) -> str:
        cfg = self.model.config
        block = "<img>" + "<IMG_CONTEXT>" * cfg.tokens_per_tile + "</img>\n"
        if n_images == 1:
            question = block + question
        elif n_images > 1:
            question = "".join(f"Image-{i + 1}: {block}" for i in range(n_images)) + question
        if thinking:
            question += THINK_SUFFIX
        sys_part = f"<|im_start|>system\n{system}<|im_end|>" if system else ""
        return f"{sys_part}<|im_start|>user\n{question}<|im_end|><|im_start|>assistant\n"

    def chat(self, images=None, question: str = "", thinking: bool = False, system: str | None = None, **gen) -> str:
        """Answer `question` about `images` (a PIL image, a path, or a list of them)."""
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        prompt = self.build_prompt(question, len(images), thinking, system)
        ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        pixels = None
        if images:
            size = self.model.config.force_image_size
            pixels = torch.stack([image_to_tile(im, size) for im in images]).to(self.model.device, self.model.dtype)
        gen.setdefault("max_new_tokens", 4096 if thinking else 1024)
        cfg = GenerationConfig(**gen)
        cfg.stop_token_ids = [*cfg.stop_token_ids, self.im_end]
        out = generate(self.model, [ids], cfg, pixel_values=pixels, decode=self.decode)
        return out.texts[0]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def load(path: str | Path, dtype=None, device=None) -> Pipeline:
    """Load a SAIL-VL2 model directory (weights + tokenizer) for chatting."""
    model = SailVL.from_pretrained(path, dtype=dtype, device=device)
    return Pipeline(model, load_tokenizer(path))
