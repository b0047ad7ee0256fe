"""Writing the synthetic world: one process (the reference: what `sailvl demo` did before session 29) against
`--workers` processes drawing the chunks of each split at once, on the tiny demo's own splits (train, the extra
training splits, val, test; `prepare_tiny`'s generation without the group views and the tokenizer), scaled by
`--fraction`. Both write to temporary directories; the table gives the wall time, samples per second and the
ratio, and the run checks that both wrote the same bytes.

Run: .venv/bin/python benchmarks/bench_synth.py [--fraction 1.0] [--workers 2]
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import print_table  # noqa: E402


def same_tree(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    return not mismatch and not errors and all(same_tree(a / d, b / d) for d in cmp.common_dirs)


def main() -> None:
    import importlib

    from sailvl.data.synth import generate_splits

    tiny = importlib.import_module("sailvl.recipes.tiny")  # the module (the package exports its function `tiny`)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fraction", type=float, default=1.0, help="of the demo's 48,000 training samples")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    if args.workers < 2:
        raise SystemExit("--workers must be >= 2 (one process is the reference)")
    n_train, n_eval = int(48_000 * args.fraction), max(1, int(950 * args.fraction))
    extra = {k: (int(n_train * f), tasks, w) for k, (f, tasks, w) in tiny.EXTRA.items()}
    n_all = n_train + 2 * n_eval + sum(v[0] for v in extra.values())
    rows, dirs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, args.workers):
            out = dirs[workers] = Path(tmp) / f"w{workers}"
            t0 = time.perf_counter()
            generate_splits(out, n_train, n_eval, n_eval, seed=0, world=tiny.TINY_WORLD, extra_train=extra,
                            workers=workers)
            dt = time.perf_counter() - t0
            rows.append([f"{workers} process{'es' if workers > 1 else ''}", n_all, dt, n_all / dt])
        same = same_tree(dirs[1], dirs[args.workers])
    rows[1].append(rows[0][2] / rows[1][2])
    rows[0].append(1.0)
    print_table(f"synthetic world, the tiny demo's splits x {args.fraction:g}",
                ["writer", "samples", "seconds", "samples/s", "speed-up"], rows)
    print(f"\nsame bytes: {same}")
    if not same:
        raise SystemExit("the two runs wrote different files")


if __name__ == "__main__":
    main()
