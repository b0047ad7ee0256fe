"""How fast a from-scratch SAIL-ViT learns to name characters, per way of setting text (World.text_grid).

The tiny recipe's tower (64 px, patch 8, width 128, 4 layers) plus a linear head on the mean of its patch
features is trained to name the single character of an OCR image (36 classes: A-Z, 0-9), `--steps` steps of
64 images, Adam lr 1e-3, bf16 autocast, and scored on 600 held-out images. Same seeds for every row; a small
CNN (3 conv layers, max-pooled: translation invariance built in) is the reference. transformers' ViTModel and
Aimv2VisionModel of the same size show whether our tower is the slow one. The SAIL-ViT rows differ only in how
the world sets text: proportional at any size in 20-30 px and any pixel position (World()'s default), at one
size, or typeset on a 4 / 8 px grid (one glyph per fixed-pitch cell, cells on the grid).

Measured 2026-11-26 on the 2-core CPU (300 steps): any size and place 0.37, one size 0.58, 4 px grid 0.98, 8 px
grid 1.00; on the default world transformers' ViTModel 0.03 and Aimv2VisionModel 0.07, the CNN reference 1.00. Sub-patch offsets and size changes are what the
tower learns slowest; the tiny world typesets on a 4 px grid at fixed sizes.

Run: .venv/bin/python benchmarks/typeset_glyphs.py [--steps 300]
"""

from __future__ import annotations

import argparse
import random
import string
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import print_table  # noqa: E402

CLASSES = string.ascii_uppercase + string.digits


def batch(world, rng: random.Random, n: int):
    from sailvl.data.image import to_tensor
    from sailvl.data.synth.render import make_text_image

    xs, ys = [], []
    for _ in range(n):
        spec, img = make_text_image(rng, world)
        xs.append(to_tensor(img))
        ys.append(CLASSES.index(spec["text"]))
    return torch.stack(xs), torch.tensor(ys)


def tower():
    from sailvl.model.vlm import SailVL
    from sailvl.recipes.tiny import tiny_model

    vit = SailVL(tiny_model()).vision_model
    return vit, lambda x: vit(x, select_layer=-1).mean(1)


def hf(name: str):
    """transformers' ViT or AIMv2 vision model of the tiny tower's size (random init): the reference ViTs."""
    import transformers as T

    dims = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=384, image_size=64,
                patch_size=8)
    if name == "vit":
        model = T.ViTModel(T.ViTConfig(**dims, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                           add_pooling_layer=False)
        return model, lambda x: model(pixel_values=x).last_hidden_state[:, 1:].mean(1)
    model = T.Aimv2VisionModel(T.Aimv2VisionConfig(**dims))
    return model, lambda x: model(pixel_values=x).last_hidden_state.mean(1)


def cnn():
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten())
    return net, net


def run(world, make, steps: int) -> tuple[float, float]:
    torch.manual_seed(0)
    module, encode = make()
    head = nn.Linear(128, len(CLASSES))
    opt = torch.optim.AdamW([*module.parameters(), *head.parameters()], lr=1e-3, betas=(0.9, 0.95))
    test_x, test_y = batch(world, random.Random(999), 600)
    rng = random.Random(0)
    t0 = time.perf_counter()
    for _ in range(steps):
        x, y = batch(world, rng, 64)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = head(encode(x))
        nn.functional.cross_entropy(logits.float(), y).backward()
        opt.step()
        opt.zero_grad()
    seconds = time.perf_counter() - t0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        acc = (head(encode(test_x)).argmax(-1) == test_y).float().mean().item()
    return acc, seconds


def main() -> None:
    from sailvl.data.synth.world import World

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    one = World(ocr_max_chars=1)
    rows = []
    variants = [
        ("SAIL-ViT", "any size 20-30 px, any place (World default)", one, tower),
        ("SAIL-ViT", "26 px, any place", replace(one, ocr_font=(26, 26)), tower),
        ("SAIL-ViT", "26 px, 4 px grid (tiny world)", replace(one, ocr_font=(26, 26), text_grid=4), tower),
        ("SAIL-ViT", "26 px, 8 px grid", replace(one, ocr_font=(26, 26), text_grid=8), tower),
        ("transformers ViTModel", "any size 20-30 px, any place (World default)", one, lambda: hf("vit")),
        ("transformers Aimv2VisionModel", "any size 20-30 px, any place (World default)", one, lambda: hf("aim")),
        ("CNN reference", "any size 20-30 px, any place (World default)", one, cnn),
    ]
    base = None
    for model, setting, world, make in variants:
        acc, seconds = run(world, make, args.steps)
        base = acc if base is None else base
        rows.append([model, setting, acc, acc / max(base, 1e-9), seconds])
        print(f"{model} / {setting}: {acc:.3f} ({seconds:.0f} s)", flush=True)
    print_table(f"single-character naming, {args.steps} steps x 64 images, 600 held out",
                ["tower", "text", "held-out acc", "x default", "train s"], rows)


if __name__ == "__main__":
    main()
