"""The tiny recipe's VLM stages from one tower, over several data orders, with optional mixture edits: how earlier
sessions measured recipe changes ("from one tower"), as a script.

The SAIL-ViT stages (vit_dense, vit_read) run once into OUT/tower (or `--tower` names a model directory to start
from); then, for every seed, the VLM stages run at the recipe's steps from that tower with the run's seed set to it
(it fixes the data order; the LLM starts from the tower run's weights each time), and the final model is scored per
task on the held-out test split. `--set STAGE.GROUP=W` changes a stage's mixture: the weight of a data group
(`recipes.tiny.GROUPS` or `EXTRA`), added if the stage has none, removed at 0. The table gives each seed's overall
accuracy and every task's mean over the seeds; OUT/NAME.json keeps the numbers.

A diagnostic rather than a benchmark: the numbers are accuracies. Two data orders of one configuration differ by up
to ~0.08 overall (session 21: 0.639 / 0.559), so compare configurations over two or more seeds and read one run only
for large per-task effects. Measured in session 21 by the session script this replaces (the same procedure: one
tower, the VLM stages per seed, mixture edits; 2-core CPU, ~9.5 min per seed, the tower ~4.5 min):
| edit | seed 0 | seed 1 |
|---|---|---|
| (the recipe before session 21) | 0.639 (math_cot 0.66) | 0.559 (math_cot 0.48) |
| --set pretrain_multitask.math_cot=0.2 --set sft.math_cot=0.3 (adopted) | 0.659 (math_cot 1.00) | 0.629 (1.00) |

`--model KEY=VALUE` edits the model config (`visual_position_code=0.3`, `llm_config.num_attention_heads=8`; dotted
keys as `sailvl train` overrides take them): the tower's ViT is kept and the adapter and LLM are initialised anew
(`common.fresh_on_tower`: seed 0, as the tower run's are; with no shape change they are the same weights).
`--tower-scale` and `--scale` multiply the SAIL-ViT and the VLM stages' steps (e.g. a smaller tower and the time
it frees given to the VLM stages); `--rows` sets the VLM stages' rows per step, `--vit-lr-ratio` the ViT's share of
the lr in vit_finegrained and vit_world (`recipes.tiny.tiny`'s argument).

Run: .venv/bin/python benchmarks/recipe_seeds.py [--data runs/seeds/data] [--out runs/seeds] [--seeds 0,1]
     [--set sft.math_cot=0.3 ...] [--model visual_position_code=0.3 ...] [--steps vit_read=500 ...]
     [--vision vit_dense.bind=1 ...]
     [--tower-scale 0.5] [--scale 1.18] [--rows 1] [--vit-lr-ratio 0]
     [--name NAME] [--tower MODEL_DIR] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import fresh_on_tower, print_table  # noqa: E402

TOWER_STAGE_NAMES = ("vit_dense", "vit_read")  # the recipe's first stages: they train only the ViT
TOWER_STAGES = len(TOWER_STAGE_NAMES)


def set_steps(run, edits: list[str], scale: float = 1.0) -> None:
    """Apply `STAGE=N` edits to a RunConfig's step counts (in place; N times `scale`, at least 1)."""
    stages = {s.name: s for s in run.stages}
    for edit in edits:
        name, sep, n = edit.partition("=")
        if not sep or not n.isdigit():
            raise SystemExit(f"--steps wants STAGE=N, got {edit!r}")
        if name not in stages:
            raise SystemExit(f"--steps {edit}: no stage {name!r} here; stages: {', '.join(stages)}")
        stages[name].steps = max(1, int(round(int(n) * scale)))


def set_vision(run, edits: list[str]) -> None:
    """Apply `STAGE.OPTION=VALUE` edits (VALUE as JSON) to a RunConfig's vision stages' options (in place)."""
    stages = {s.name: s for s in run.stages}
    for edit in edits:
        target, sep, value = edit.partition("=")
        stage_name, dot, option = target.partition(".")
        if not sep or not dot:
            raise SystemExit(f"--vision wants STAGE.OPTION=VALUE, got {edit!r}")
        if stage_name not in stages or stages[stage_name].kind != "vision":
            raise SystemExit(f"--vision {edit}: {stage_name!r} is not a vision stage here")
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        stages[stage_name].vision = {**(stages[stage_name].vision or {}), option: parsed}


def edit_mixture(run, data_dir: str, edits: list[str]) -> None:
    """Apply `STAGE.GROUP=W` edits to a tiny RunConfig's stage mixtures (in place)."""
    from sailvl.recipes.tiny import EXTRA, GROUPS, group_path
    from sailvl.train.stages import DataSpec

    stages = {s.name: s for s in run.stages}
    for edit in edits:
        try:
            target, w = edit.split("=")
            stage_name, group = target.split(".")
            weight = float(w)
        except ValueError:
            raise SystemExit(f"--set wants STAGE.GROUP=WEIGHT, got {edit!r}") from None
        if stage_name not in stages:
            raise SystemExit(f"--set {edit}: no stage {stage_name!r}; stages: {', '.join(stages)}")
        if group not in GROUPS and group not in EXTRA:
            raise SystemExit(f"--set {edit}: no data group {group!r}; groups: {', '.join([*GROUPS, *EXTRA])}")
        stage = stages[stage_name]
        if stage.kind != "vlm":
            raise SystemExit(f"--set {edit}: {stage_name} is a vision stage, it has no data mixture")
        stage.data = [d for d in stage.data if d.name != group]
        if weight > 0:
            stage.data.append(DataSpec(group_path(data_dir, group), weight, group))


def retower(tower: str, edits: list[str], out: Path) -> str:
    """`common.fresh_on_tower` with the model-config `edits`, once per (tower, edits) under `out`."""
    import hashlib

    source = str(Path(tower).resolve())  # one directory per (tower, edits): edits of two towers never collide
    tag = hashlib.sha1(source.encode()).hexdigest()[:8]
    dest = out / (f"retower_{tag}_" + "_".join(e.replace("=", "") for e in edits))
    if not (dest / "model.safetensors").exists():
        try:
            fresh_on_tower(tower, dest, overrides=edits)
        except ValueError as e:  # an unknown key, with the closest known ones
            raise SystemExit(f"--model: {e}") from None
        (dest / "SOURCE").write_text(f"{source}\n{' '.join(edits)}\n")
    return str(dest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="runs/seeds/data", help="the tiny recipe's data dir (prepared if missing)")
    ap.add_argument("--out", default="runs/seeds")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--set", dest="edits", action="append", default=[], metavar="STAGE.GROUP=W")
    ap.add_argument("--name", default=None, help="default: the edits, or 'recipe'")
    ap.add_argument("--tower", default=None, help="a model directory to start the VLM stages from")
    ap.add_argument("--model", dest="model_edits", action="append", default=[], metavar="KEY=VALUE",
                    help="a model config edit (dotted, e.g. llm_config.head_dim=32): the tower's ViT with an "
                         "adapter and LLM initialised anew")
    ap.add_argument("--steps", dest="step_edits", action="append", default=[], metavar="STAGE=N",
                    help="a stage's step count (a SAIL-ViT stage: a tower of its own, named after the edits)")
    ap.add_argument("--vision", dest="vision_edits", action="append", default=[], metavar="STAGE.OPTION=VALUE",
                    help="a SAIL-ViT stage's vision option (e.g. vit_dense.bind=1): a tower of its own")
    ap.add_argument("--tower-scale", type=float, default=1.0, help="multiplies the SAIL-ViT stages' steps")
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies the VLM stages' steps")
    ap.add_argument("--vit-lr-ratio", type=float, default=0.1, help="the ViT's share of the lr in vit_finegrained "
                    "and vit_world (0: frozen there too; the recipe: 0.1)")
    ap.add_argument("--rows", type=int, default=None, help="rows of 512 tokens per step in every VLM stage "
                    "(the recipe: 2)")
    ap.add_argument("--quick", action="store_true", help="tiny data and 1%% of the steps (a smoke run)")
    args = ap.parse_args()

    from sailvl import load
    from sailvl.cli import _tune_malloc
    from sailvl.eval.synth import evaluate
    from sailvl.recipes.tiny import prepare_tiny, tiny
    from sailvl.train.trainer import Trainer

    _tune_malloc()
    out, data = Path(args.out), Path(args.data)
    quick = 0.01 if args.quick else 1.0
    name = args.name or ("_".join(e.replace("=", "") for e in
                                  args.vision_edits + args.model_edits + args.step_edits + args.edits)
                         or "recipe")
    prepare_tiny(tiny(data_dir=str(data)), **(dict(n_train=600, n_eval=76) if args.quick else {}))
    tower = args.tower
    tower_edits = [e for e in args.step_edits if e.split("=")[0] in TOWER_STAGE_NAMES]
    if tower is not None and (args.tower_scale != 1 or tower_edits or args.vision_edits):
        raise SystemExit("--tower names a trained tower: --tower-scale, --vision and --steps for its stages do not "
                         "apply")
    if tower is None:
        tower_name = "tower" + ("" if args.tower_scale == 1 else f"_x{args.tower_scale:g}") + "".join(
            "_" + e.replace("=", "") for e in tower_edits + args.vision_edits)
        run = tiny(data_dir=str(data), out_dir=str(out), name=tower_name, scale=quick * args.tower_scale)
        run.stages = run.stages[:TOWER_STAGES]
        set_steps(run, tower_edits, quick)
        set_vision(run, args.vision_edits)
        tower = str(Trainer(run, resume=(Path(run.run_dir) / "run.json").exists()).fit())
    if args.model_edits:
        tower = retower(tower, args.model_edits, out)
    per_seed = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        run = tiny(data_dir=str(data), out_dir=str(out), name=f"{name}_s{seed}", scale=quick * args.scale,
                   vit_lr_ratio=args.vit_lr_ratio)
        run.seed, run.init, run.stages = seed, tower, run.stages[TOWER_STAGES:]
        edit_mixture(run, str(data), args.edits)
        set_steps(run, [e for e in args.step_edits if e not in tower_edits], quick)
        if args.rows is not None:
            for stage in run.stages:
                stage.rows_per_step = args.rows
        t0 = time.perf_counter()
        final = Trainer(run, resume=(Path(run.run_dir) / "run.json").exists()).fit()
        train_s = time.perf_counter() - t0
        pipe = load(final, device="cpu")
        report = evaluate(pipe.model, pipe.processor, data / "test.jsonl",
                          out_jsonl=Path(run.run_dir) / "eval_test.jsonl")
        per_seed[seed] = {"accuracy": report["accuracy"], "train_s": train_s,
                          "tasks": {k: v["score"] for k, v in report["tasks"].items()},
                          "chance": {k: v["chance"] for k, v in report["tasks"].items()}}
        print(f"[seeds] {name} seed {seed}: {report['accuracy']:.3f} ({train_s:.0f} s)", flush=True)
    record = {"edits": args.edits, "model": args.model_edits, "steps": args.step_edits, "vision": args.vision_edits,
              "tower_scale": args.tower_scale, "scale": args.scale, "rows": args.rows,
              "vit_lr_ratio": args.vit_lr_ratio, "tower": tower, "seeds": per_seed}
    (out / f"{name}.json").write_text(json.dumps(record, indent=1))
    seeds = sorted(per_seed)
    tasks = sorted(per_seed[seeds[0]]["tasks"])
    overall = [per_seed[s]["accuracy"] for s in seeds]
    rows = [["overall", *(f"{x:.3f}" for x in overall), f"{sum(overall) / len(overall):.3f}"]]
    for t in tasks:
        scores = [per_seed[s]["tasks"][t] for s in seeds]
        rows.append([t, *(f"{x:.2f}" for x in scores), f"{sum(scores) / len(scores):.2f}"])
    print_table(f"{name}: the VLM stages from one tower, held-out accuracy per data-order seed",
                ["task", *(f"seed {s}" for s in seeds), "mean"], rows)


if __name__ == "__main__":
    main()
