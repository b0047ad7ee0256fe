"""Image preprocessing throughput (images/s): sailvl's Processor vs a straightforward PIL + numpy pipeline
(InternVL-style: decode, RGB, resize, crop each tile, convert and normalise each tile), same process,
same JPEG inputs. Tiles mode at SAIL-VL2's settings (448 px tiles, up to 10 + thumbnail) and the tiny
demo's (64 px), and native-resolution mode.

Run: .venv/bin/python benchmarks/bench_preprocess.py [--quick]
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import compare, print_table  # noqa: E402
from sailvl.data.image import candidate_grids, closest_grid, native_size  # noqa: E402
from sailvl.data.processor import Processor, ProcessorConfig  # noqa: E402
from sailvl.data.tokenizer import train_bpe  # noqa: E402

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def reference_tiles(data: bytes, tile: int, max_num: int) -> torch.Tensor:
    im = Image.open(io.BytesIO(data)).convert("RGB")
    cols, rows = closest_grid(im.width, im.height, candidate_grids(1, max_num), tile)
    resized = im.resize((tile * cols, tile * rows), Image.BICUBIC)
    tiles = [resized.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(cols)]
    if len(tiles) > 1:
        tiles.append(im.resize((tile, tile), Image.BICUBIC))
    out = []
    for t in tiles:
        arr = (np.asarray(t).astype(np.float32) / 255.0 - MEAN) / STD
        out.append(torch.from_numpy(arr.transpose(2, 0, 1).astype(np.float32)))
    return torch.stack(out)


def reference_native(data: bytes, factor: int, lo: int, hi: int) -> torch.Tensor:
    im = Image.open(io.BytesIO(data)).convert("RGB")
    im = im.resize(native_size(im.width, im.height, factor, lo, hi), Image.BICUBIC)
    arr = (np.asarray(im).astype(np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(arr.transpose(2, 0, 1).astype(np.float32))


def jpeg(w, h, seed):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (max(h // 16, 1), max(w // 16, 1), 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((w, h), Image.BILINEAR).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    tok_dir = Path(__file__).resolve().parents[1] / "runs" / "bench_tok"
    tok = train_bpe(["a b c"] * 10, 300, tok_dir)
    settings = [  # name, processor config, image sizes
        ("tiles 448, max 10", ProcessorConfig(image_size=448, patch_size=14, max_dynamic_patch=10),
         [(1024, 768), (640, 480), (1600, 900), (500, 1500)]),
        ("tiles 64 (tiny demo)", ProcessorConfig(image_size=64, patch_size=8, max_dynamic_patch=4),
         [(64, 64), (128, 64), (96, 96), (64, 128)]),
        ("native, <= 1024^2 px", ProcessorConfig(mode="native", patch_size=14, max_pixels=1024 * 1024),
         [(1024, 768), (640, 480), (1600, 900), (500, 1500)]),
    ]
    rows = []
    for name, cfg, sizes in settings:
        proc = Processor(tok, cfg)
        images = [jpeg(w, h, i) for i, (w, h) in enumerate(sizes)]
        if cfg.mode == "native":
            ref = lambda: [reference_native(d, cfg.factor, cfg.min_pixels, cfg.max_pixels) for d in images]  # noqa: E731
        else:
            ref = lambda: [reference_tiles(d, cfg.image_size, cfg.max_dynamic_patch) for d in images]  # noqa: E731
        ours = lambda: proc.image_inputs(images)  # noqa: E731
        a, b = ref(), ours()[0]
        same = all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a, b))
        t = compare({"ref": ref, "ours": ours}, warmup=1, repeat=3 if args.quick else 7)
        n = len(images)
        rows.append([name, n / t["ref"], n / t["ours"], t["ref"] / t["ours"], same])
    print_table("Image preprocessing, images/s (higher is better)",
                ["setting", "reference PIL+numpy", "sailvl Processor", "ratio", "same tensors"], rows)
    loader_rate(tok, 400 if args.quick else 2000)


def loader_rate(tok, n: int) -> None:
    """End-to-end data rate of the tiny recipe's input path: synthetic JSONL -> source -> processor
    (decode, tile, template, tokenize, labels) through the MixtureLoader, one process."""
    import tempfile
    import time

    from sailvl.data.loader import MixtureLoader
    from sailvl.data.sources import JsonlSource
    from sailvl.data.synth import generate

    with tempfile.TemporaryDirectory() as d:
        generate(d, n, seed=0)
        proc = Processor(tok, ProcessorConfig(image_size=64, patch_size=8, max_dynamic_patch=1))
        loader = MixtureLoader([(JsonlSource(Path(d) / "train.jsonl"), 1.0)], epochs=1, process=proc.encode_sample)
        t0 = time.perf_counter()
        items = list(loader)
        dt = time.perf_counter() - t0
    tokens = sum(len(x["input_ids"]) for x in items)
    print_table("Loader + processor on the synthetic world (64 px, 1 tile), one process",
                ["samples", "samples/s", "tokens/s", "skipped"], [[len(items), len(items) / dt, tokens / dt,
                                                                 loader.stats["skipped"]]])


if __name__ == "__main__":
    main()
