"""What a SAIL-ViT tower carries: linear probes on its frozen patch features, per property of the synthetic world.

For each probe, images are drawn from the tiny recipe's worlds (3,000 to fit, 600 held out, other seeds), the
tower's last-layer patch features computed once, and a linear classifier fitted with Adam on standardised
features. `flat`: one classifier over all patch features concatenated (can use where things are, but must learn
every place separately); `mil`: one classifier on every patch, log-sum-exp over patches (the same wherever the
thing is). The table gives train / held-out accuracy against the majority class. A tower that reads should give
>= 0.9 held out on single characters; the demo's (docs/demo_log.md) gives about 0.2.

Run: .venv/bin/python benchmarks/probe_tower.py runs/demo/01_vit_read/model [--iters 1000] [--lr 1e-2] [--only chart]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import print_table  # noqa: E402


def features(model, processor, images) -> torch.Tensor:
    x = torch.stack([processor([{"role": "user", "content": "<image>\nx"}], [im])["pixel_values"][0] for im in images])
    with torch.no_grad():
        return model.vision_model(x.float(), select_layer=model.config.select_layer)  # [N, patches, width]


def draw(model, processor, task, world, n, seed, label):
    from sailvl.data.synth import sample

    rng = random.Random(seed)
    images, labels = [], []
    for _ in range(n):
        record, ims = sample(task, rng, world=world)
        images.append(ims[0])
        labels.append(label(record))
    return torch.cat([features(model, processor, images[i:i + 256]) for i in range(0, n, 256)]), labels


def fit(f_tr, y_tr, f_te, y_te, mode: str, iters: int, lr: float) -> tuple[float, float]:
    classes = {c: i for i, c in enumerate(sorted(set(y_tr)))}
    t_tr = torch.tensor([classes[y] for y in y_tr])
    t_te = torch.tensor([classes.get(y, -1) for y in y_te])
    if mode == "flat":
        f_tr, f_te = f_tr.flatten(1), f_te.flatten(1)
    dims = tuple(range(f_tr.dim() - 1))
    mu, sd = f_tr.mean(dims), f_tr.std(dims) + 1e-4
    f_tr, f_te = (f_tr - mu) / sd, (f_te - mu) / sd
    w = torch.zeros(f_tr.shape[-1], len(classes), requires_grad=True)
    b = torch.zeros(len(classes), requires_grad=True)

    def logits(f):
        z = f @ w + b
        return torch.logsumexp(z, 1) if mode == "mil" else z
    opt = torch.optim.Adam([w, b], lr=lr, weight_decay=1e-4)
    for _ in range(iters):
        loss = torch.nn.functional.cross_entropy(logits(f_tr), t_tr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return ((logits(f_tr).argmax(1) == t_tr).float().mean().item(),
                (logits(f_te).argmax(1) == t_te).float().mean().item())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--iters", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--only", default="", help="run the probes whose name contains this (e.g. chart)")
    args = ap.parse_args()
    from sailvl import load
    from sailvl.recipes.tiny import BASICS_WORLD, TINY_WORLD

    torch.manual_seed(0)
    pipe = load(args.model)
    model = pipe.model.float().eval()
    probes = [("single character (ocr, basics world)", "ocr", BASICS_WORLD, lambda r: r["answer"]),
              ("first character of an OCR text", "ocr", TINY_WORLD, lambda r: r["answer"][0]),
              ("number of objects", "vqa_count", TINY_WORLD, lambda r: str(len(r["meta"]["scene"]))),
              ("first operand of an equation", "math_direct", TINY_WORLD, lambda r: str(r["meta"]["a"])),
              ("table cell at row 1, column 1", "table", TINY_WORLD, lambda r: str(r["meta"]["cells"][0][0])),
              ("label of a chart's first item", "chart", TINY_WORLD, lambda r: r["meta"]["labels"][0]),
              ("label of a chart's middle item", "chart", TINY_WORLD, lambda r: r["meta"]["labels"][1]),
              ("value of a chart's first item", "chart", TINY_WORLD, lambda r: str(r["meta"]["values"][0]))]
    probes = [p for p in probes if args.only in p[0]]
    if not probes:
        raise SystemExit(f"--only {args.only!r} matches no probe")
    rows = []
    for name, task, world, label in probes:
        f_tr, y_tr = draw(model, pipe.processor, task, world, args.n, 1, label)
        f_te, y_te = draw(model, pipe.processor, task, world, 600, 2, label)
        majority = max(y_te.count(c) for c in set(y_te)) / len(y_te)
        row = [name, len(set(y_tr))]
        for mode in ("flat", "mil"):
            row += list(fit(f_tr, y_tr, f_te, y_te, mode, args.iters, args.lr))
        rows.append(row + [majority])
        print(f"  {name}: done", flush=True)
    print_table(f"linear probes on {args.model} ({args.n} fit / 600 held out)",
                ["property", "classes", "flat train", "flat held out", "mil train", "mil held out", "majority"], rows)


if __name__ == "__main__":
    main()
