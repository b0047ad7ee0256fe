"""Does an object's place survive into the image tokens the LLM reads? Linear probes on a model's adapter outputs.

Images of one object (the tiny world with max_objects=1; 1,500 to fit, 500 held out) go through the model's tower
and adapter (`SailVL.encode_images`: 16 LLM-space tokens per 64 px image). Label: the object's position phrase (one
of nine: "at the top left" ... "in the centre", what the captions say). Two probes, linear on standardised features:
`object mean`: the mean of the tokens weighted by how many of each token's pixels the object covers, which is what
attention that finds the object by its content hands on (no slot identity); `all tokens`: the 16 tokens
concatenated (a slot's index says where it is; the control). Majority class for reference.

Measured on the 2-core CPU (2026-12-03, session 13; final models of the demo's recipe): SAIL-ViT stages without
position labels (the default) object mean 0.25 / all tokens 0.88 (majority 0.13): the tokens say where an object is
almost only through which slot holds it; with position heads (row / column per patch, weight 1) 0.86 / 0.91.

Run: .venv/bin/python benchmarks/probe_position.py MODEL_DIR [MODEL_DIR ...] [--n 2000]
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import print_table  # noqa: E402


def scenes(n: int, seed: int):
    """n one-object images with the object's position phrase and the object's pixel count per 16 px token."""
    from sailvl.data.synth import sample
    from sailvl.data.synth.scene import Obj, position_phrase
    from sailvl.data.synth.world import BACKGROUND
    from sailvl.recipes.tiny import TINY_WORLD

    world, rng = replace(TINY_WORLD, max_objects=1), random.Random(seed)
    out = []
    for _ in range(n):
        record, (im,) = sample("vqa_shape", rng, world=world)
        obj = Obj.from_dict(record["meta"]["scene"][0])
        ink = (np.abs(np.asarray(im, dtype=np.int32) - np.array(BACKGROUND)).sum(-1) > 30).astype(np.float32)
        g = world.image_size // 4  # 4 x 4 tokens after the 2 x 2 pixel shuffle of an 8 x 8 patch grid
        cover = torch.from_numpy(ink.reshape(4, g, 4, g).sum((1, 3)).reshape(16))
        out.append((im, position_phrase(obj, world.image_size), cover))
    return out


def fit(x_tr, y_tr, x_te, y_te, iters: int = 400) -> float:
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-4
    x_tr, x_te = (x_tr - mu) / sd, (x_te - mu) / sd
    lin = torch.nn.Linear(x_tr.shape[1], int(y_tr.max()) + 1)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(iters):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lin(x_tr), y_tr).backward()
        opt.step()
    with torch.no_grad():
        return (lin(x_te).argmax(-1) == y_te).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="model directories (SAIL-VL2 layout)")
    ap.add_argument("--n", type=int, default=2000, help="images; a quarter is held out")
    args = ap.parse_args()
    from sailvl import load

    torch.manual_seed(0)
    data = scenes(args.n, seed=0)
    phrases = sorted({p for _, p, _ in data})
    y = torch.tensor([phrases.index(p) for _, p, _ in data])
    cover = torch.stack([c for _, _, c in data])  # [n, 16]
    cut = args.n * 3 // 4
    majority = torch.bincount(y[cut:]).max().item() / (args.n - cut)
    rows = []
    for path in args.models:
        pipe = load(path)
        model = pipe.model.float().eval()
        toks = []
        with torch.no_grad():
            for i in range(0, args.n, 100):
                px = torch.cat([pipe.processor.image_inputs([im])[0][0] for im, _, _ in data[i:i + 100]])
                toks.append(model.encode_images(px).reshape(-1, 16, model.config.llm_config.hidden_size))
        t = torch.cat(toks)  # [n, 16, E]
        mean = (cover[..., None] * t).sum(1) / cover.sum(1, keepdim=True).clamp(min=1)
        rows.append([path, fit(mean[:cut], y[:cut], mean[cut:], y[cut:]),
                     fit(t.flatten(1)[:cut], y[:cut], t.flatten(1)[cut:], y[cut:]), majority])
        print(f"  {path}: done", flush=True)
    print_table(f"position phrase of one object ({len(phrases)} classes) from the adapter outputs, "
                f"{cut} fit / {args.n - cut} held out", ["model", "object mean", "all tokens", "majority"], rows)


if __name__ == "__main__":
    main()
