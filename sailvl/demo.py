"""`sailvl demo`: the end-to-end smoke run until the training issue turns it into the real demo.

It trains a small BPE tokenizer, builds tiny random SAIL-VL2 models (dense and MoE), saves each in the
SAIL-VL2 layout, reloads it, checks the reload is bit-exact, and generates from an image + question.
The model is untrained, so the answer is random text: this shows the plumbing, not a capability.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .config import tiny_config
from .data.processor import Processor, ProcessorConfig
from .data.tokenizer import token_id, train_bpe
from .model.vlm import SailVL
from .pipeline import load

CORPUS = [
    "a red circle is left of a blue square.",
    "there are three green triangles in the picture.",
    "what colour is the shape? answer the question using a single word or phrase.",
    "the chart shows values 3, 7 and 12; the largest bar is the second one.",
] * 50


def demo_image() -> Image.Image:
    im = Image.new("RGB", (64, 64), "white")
    d = ImageDraw.Draw(im)
    d.ellipse((6, 10, 28, 32), fill="red")
    d.rectangle((36, 30, 58, 52), fill="blue")
    return im


def run(out_dir: str | Path = "runs/demo", seed: int = 0) -> list[dict]:
    out_dir = Path(out_dir)
    rows = []
    for name, moe in (("dense", False), ("moe", True)):
        model_dir = out_dir / name
        tok = train_bpe(CORPUS, vocab_size=400, out_dir=model_dir)
        cfg = tiny_config(vocab_size=tok.get_vocab_size(), moe=moe)
        cfg.img_context_token_id = token_id(tok, "<IMG_CONTEXT>")
        torch.manual_seed(seed)
        model = SailVL(cfg)
        model.save_pretrained(model_dir)
        Processor(tok, ProcessorConfig.from_model_config(cfg)).save_pretrained(model_dir)
        pipe = load(model_dir)
        exact = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), pipe.model.state_dict().values()))
        t0 = time.perf_counter()
        answer = pipe.chat(demo_image(), "What colour is the circle?", max_new_tokens=16)
        dt = time.perf_counter() - t0
        n_params = sum(p.numel() for p in model.parameters())
        rows.append({"model": name, "params": n_params, "reload_exact": exact, "seconds": dt, "answer": answer})
        print(f"[{name}] {n_params / 1e6:.2f}M params, saved to {model_dir}, reload bit-exact: {exact}")
        print(f"[{name}] Q: What colour is the circle?  A (untrained, random): {answer!r}  ({dt:.2f}s)")
    return rows
