"""`sailvl plot RUN_DIR`: loss, lr and throughput curves from metrics.jsonl to a PNG (matplotlib, the `plot` extra).
Stages are laid end to end on one step axis, with their boundaries marked; evaluation accuracies, when a
run has them (`eval_*.json` with an "accuracy"), are listed in the title."""

from __future__ import annotations

import json
from pathlib import Path


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'sailvl[plot]'") from None
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise ValueError(f"{run_dir} has no metrics.jsonl (not a run directory?)")
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not recs:
        raise ValueError(f"{path} is empty")
    xs, offset, bounds, last = [], 0, [], None
    for r in recs:
        if r["stage"] != last:
            if last is not None:
                offset = xs[-1]
            bounds.append((offset, r["stage"]))
            last = r["stage"]
        xs.append(offset + r["step"])
    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    for ax, key, label in zip(axes, ("loss", "lr", "tokens_per_s"), ("loss", "learning rate", "tokens / s")):
        ax.plot(xs, [r.get(key, float("nan")) for r in recs], lw=1)
        ax.set_ylabel(label)
        for x, name in bounds:
            ax.axvline(x, color="grey", lw=0.5, ls="--")
            if ax is axes[0]:
                ax.text(x, ax.get_ylim()[1], name, rotation=90, va="top", fontsize=7)
    axes[0].set_yscale("log")
    axes[-1].set_xlabel("step (stages end to end)")
    accs = []
    for f in sorted(run_dir.glob("*report*.json")):
        acc = json.loads(f.read_text()).get("accuracy")
        if acc is not None:
            accs.append(f"{f.stem}: accuracy {acc:.2f}")
    fig.suptitle(f"{run_dir.name}" + (" — " + "; ".join(accs) if accs else ""))
    out = Path(out) if out else run_dir / "curves.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
