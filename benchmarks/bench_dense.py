"""The SAIL-ViT stages' in-memory data: `DenseStream.batch` (64 images drawn and labelled per patch) with sailvl's
`_Canvas` against the previous implementation (kept below as the reference), same images, same process.

The dense kinds draw each element (object, bar, glyph) onto the image and record which element painted each pixel
last; the labels are then the element painting the most of each patch. Reference: every paint copies the image
before and after the draw and compares the two with `.any(-1)`, and the labels count each element's pixels per patch
with one comparison per element. sailvl's: one snapshot per paint (the previous one is kept), the channel test as
three ors, and the per-patch counts as one `np.bincount`. The batches must be identical (checked byte for byte).

The tiny recipe draws such a batch on every vit_dense step (600 steps, where ~40% of a step's time was drawing) and
vit_read (400 steps; 2 of its 7 image kinds are dense scenes).

Run: .venv/bin/python benchmarks/bench_dense.py [--batches 4]
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import compare, print_table  # noqa: E402
from sailvl.data.synth import dense  # noqa: E402


# ------------------------------------------------------------------------------------ the reference code
def ref_init(self, img) -> None:
    self.img, self.draw = img, dense.ImageDraw.Draw(img)
    self.owner = np.full((img.height, img.width), -1, dtype=np.int64)
    self.elements = []


def ref_paint(self, fn, element) -> None:
    before = np.asarray(self.img).copy()
    fn(self.draw)
    changed = (np.asarray(self.img) != before).any(-1)
    self.owner[changed] = -1 if element is None else len(self.elements)
    if element is not None:
        self.elements.append(element)


def ref_labels(self, patch: int) -> dict[str, np.ndarray]:
    h, w = self.owner.shape
    g_h, g_w = h // patch, w // patch
    n = len(self.elements)
    out = {name: np.zeros((g_h, g_w), dtype=np.int64) for name in (*dense.HEADS, *dense.BIND_HEADS)}
    if n == 0:
        return out
    blocks = self.owner.reshape(g_h, patch, g_w, patch).transpose(0, 2, 1, 3).reshape(g_h, g_w, -1)
    counts = np.stack([(blocks == e).sum(-1) for e in range(n)], -1)
    best = counts.argmax(-1)
    hit = counts.max(-1) >= dense.MIN_PIXELS
    for name, vocab in (dense.HEADS | dense.BIND_HEADS).items():
        index = {v: i for i, v in enumerate(vocab)}
        ids = np.array([index[getattr(e, name)] for e in self.elements], dtype=np.int64)
        out[name] = np.where(hit, ids[best], 0)
    return out


@contextmanager
def reference():
    saved = {k: getattr(dense._Canvas, k) for k in ("__init__", "paint", "labels")}
    dense._Canvas.__init__, dense._Canvas.paint, dense._Canvas.labels = ref_init, ref_paint, ref_labels
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(dense._Canvas, k, v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=4, help="batches of 64 images per timed run")
    args = ap.parse_args()
    from sailvl.recipes.tiny import TINY_WORLD

    rows = []
    for name, kinds in (("vit_dense's kinds", None), ("scenes only", {"scene": 1.0}), ("charts only", {"chart": 1.0})):
        stream = dense.DenseStream(TINY_WORLD, 8, seed=3, **({} if kinds is None else {"kinds": kinds}))

        def draw(stream=stream):
            return [stream.batch(i, 64) for i in range(args.batches)]

        def draw_ref(stream=stream):
            with reference():
                return [stream.batch(i, 64) for i in range(args.batches)]

        for (pa, la), (pb, lb) in zip(draw(), draw_ref()):  # the same images and labels
            assert torch.equal(pa, pb) and all(torch.equal(la[k], lb[k]) for k in la), name
        t = compare({"sailvl": draw, "reference": draw_ref}, warmup=1, repeat=5)
        per = lambda s: s / args.batches * 1000  # noqa: E731  ms per batch of 64
        rows.append([name, per(t["reference"]), per(t["sailvl"]), t["reference"] / t["sailvl"]])
    print_table("DenseStream.batch(step, 64): ms per batch, best of 5 (identical output checked)",
                ["images", "reference ms", "sailvl ms", "speed-up"], rows)


if __name__ == "__main__":
    main()
