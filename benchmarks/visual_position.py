"""Does the LLM find where a named object is sooner with the visual position code (SailVLConfig.visual_position_code)?

The lookup every question about places needs: "Where is the <shape>?" about a tiny-world scene of 1-3 objects
(benchmarks/llm_init.py's records), answered with the captions' 3 x 3 position words. The ViT is a trained
tower (frozen; the demo's by default: run `make demo` first); adapter and LLM start from the same random weights
(init std 0.06) and train the same steps on the same data with Muon, once per code share (0 = SAIL-VL2's adapter).
Held-out accuracy overall and by number of objects; ratios against the first share.

Measured on the 2-core CPU: see the README's benchmark table.

Run: .venv/bin/python benchmarks/visual_position.py [--tower runs/demo/01_vit_read/model] [--steps 800]
     [--codes 0,0.7]
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import fresh_on_tower, probe_run, train_and_score  # noqa: E402
from benchmarks.llm_init import where_benchmark, where_parser  # noqa: E402


def run_one(tower: str, code: float, data: Path, steps: int, work: Path) -> tuple[float, dict, float]:
    from sailvl.config import SailVLConfig

    init = fresh_on_tower(tower, work / f"init_{code}", std=0.06)
    cfg = SailVLConfig.load(init / "config.json")
    dataclasses.replace(cfg, visual_position_code=code).save(init / "config.json")  # no weights of its own
    run = probe_run(f"code_{code}", data / "train.jsonl", init, work, steps, optimizer="muon")
    return train_and_score(run, data / "test.jsonl", work / f"eval_{code}.jsonl", lambda r: r["objects"])


def main() -> None:
    ap = where_parser(__doc__.splitlines()[0])
    ap.add_argument("--codes", default="0,0.7", help="code shares to compare (0 = no code)")
    args = ap.parse_args()
    where_benchmark(args, [float(c) for c in args.codes.split(",")], run_one, "position code", " (Muon)")


if __name__ == "__main__":
    main()
