"""How fast a from-scratch tiny LLM learns to find an object named in the question, per LLM init std.

The task isolates the lookup every scene question needs: "Where is the <shape>?" about a tiny-world scene of 1-3
objects (the shape unique in its scene), answered with the 3 x 3 position words the captions use ("top left",
"centre", ...). The ViT is a trained tower (frozen, the demo's by default: run `make demo` first); adapter and
LLM start from random weights drawn with each init std and train the same steps on the same data. Held-out
accuracy overall and by number of objects; ratios against HF's default std 0.02.

Measured on the 2-core CPU (800 steps of 2 x 512 tokens, ~100 s per row): std 0.02 0.59 (1 / 2 / 3 objects
0.89 / 0.53 / 0.27), std 0.06 0.67 (0.89 / 0.60 / 0.45), 1.14x (an earlier draw of the data: 0.60 -> 0.70). A
session script on the demo's own records gave 0.54 / 0.65 (std 0.1: 0.63). The tiny recipe draws its LLM with 0.06 (about 1 / sqrt(width)).

Run: .venv/bin/python benchmarks/llm_init.py [--tower runs/demo/01_vit_read/model] [--steps 800] [--stds 0.02,0.06]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from collections import Counter
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import fresh_on_tower, print_table, probe_run, train_and_score  # noqa: E402


def where_records(n: int, seed: int, out: Path, split: str) -> None:
    """n "Where is the <shape>?" records with their images under out/split/."""
    from sailvl.data.synth import sample
    from sailvl.data.synth.scene import Obj, position_phrase
    from sailvl.recipes.tiny import TINY_WORLD

    rng = random.Random(seed)
    (out / split).mkdir(parents=True, exist_ok=True)
    lines = []
    while len(lines) < n:
        record, images = sample("vqa_shape", rng, world=TINY_WORLD)
        scene = [Obj.from_dict(o) for o in record["meta"]["scene"]]
        shapes = Counter(o.shape for o in scene)
        unique = [o for o in scene if shapes[o.shape] == 1]
        if not unique:
            continue
        obj = rng.choice(unique)
        answer = position_phrase(obj, TINY_WORLD.image_size).split(" ", 2)[-1]  # "at the top left" -> "top left"
        path = out / split / f"{len(lines):06d}.png"
        images[0].save(path)
        lines.append(json.dumps({"task": "where", "answer": answer, "image": str(path), "objects": len(scene),
                                 "conversations": [{"from": "human", "value": f"<image>\nWhere is the {obj.shape}?"},
                                                   {"from": "gpt", "value": answer}]}))
    (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


def run_one(tower: str, std: float, data: Path, steps: int, work: Path) -> tuple[float, dict, float]:
    init = fresh_on_tower(tower, work / f"init_{std}", std=std)  # adapter and LLM drawn with `std`, the tower copied
    run = probe_run(f"std_{std}", data / "train.jsonl", init, work, steps)
    return train_and_score(run, data / "test.jsonl", work / f"eval_{std}.jsonl", lambda r: r["objects"])


def where_benchmark(args, values: list[float], run_one, name: str, title: str) -> None:
    """Train `run_one(tower, value, data, steps, work)` on the same "where" records for each value and print the
    held-out accuracy overall and by number of objects, with ratios against the first value."""
    if not (Path(args.tower) / "config.json").exists():
        raise SystemExit(f"no model directory at {args.tower}: run `make demo` first or pass --tower")
    from sailvl.cli import _tune_malloc

    _tune_malloc()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        where_records(args.n_train, 1, work / "data", "train")
        where_records(args.n_test, 2, work / "data", "test")
        rows, ref = [], None
        for value in values:
            acc, by_n, seconds = run_one(args.tower, value, work / "data", args.steps, work)
            ref = acc if ref is None else ref
            rows.append([f"{value:g}", f"{acc:.3f}", *(f"{by_n.get(n, float('nan')):.2f}" for n in (1, 2, 3)),
                         f"{seconds:.0f}", f"{acc / max(ref, 1e-9):.2f}x"])
            print(rows[-1], flush=True)
    print_table(f"'Where is the <shape>?' after {args.steps} steps of 2 x 512 tokens{title}, {args.n_test} held out",
                [name, "held-out", "1 object", "2 objects", "3 objects", "train s", f"vs {values[0]:g}"], rows)


def where_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every "where" benchmark takes (tower, steps, record counts)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--tower", default="runs/demo/01_vit_read/model", help="a model directory whose ViT is used")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--n-train", type=int, default=12000)
    ap.add_argument("--n-test", type=int, default=600)
    return ap


def main() -> None:
    ap = where_parser(__doc__.splitlines()[0])
    ap.add_argument("--stds", default="0.02,0.06")
    args = ap.parse_args()
    where_benchmark(args, [float(s) for s in args.stds.split(",")], run_one, "LLM init std", "")


if __name__ == "__main__":
    main()
