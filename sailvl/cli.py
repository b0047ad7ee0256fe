"""The `sailvl` command. Subcommands are thin: they parse flags and call library functions."""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from .demo import run

    _tune_malloc()
    run(args.out, scale=args.scale, quick=args.quick, seed=args.seed, resume=args.resume, procs=args.procs,
        minutes=args.minutes)
    return 0


def _tune_malloc() -> None:
    """Keep freed memory in the process (glibc): on VMs where fresh pages are expensive, returning and
    re-faulting the activations' memory every training step cost several-fold slowdowns."""
    import ctypes
    import sys as _sys

    if not _sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 1 << 25)  # M_MMAP_THRESHOLD (glibc's maximum, 32 MiB)
        libc.mallopt(-2, 1 << 28)  # M_TOP_PAD
    except (OSError, AttributeError):
        pass


def _compose(args) -> int:
    from .checkpoint.imports import compose

    overrides = {}
    if args.max_dynamic_patch is not None:
        overrides["max_dynamic_patch"] = args.max_dynamic_patch
    out = compose(args.vision, args.llm, args.out, select_layer=args.select_layer, seed=args.seed, **overrides)
    print(f"wrote a SAIL-VL2 model directory to {out}")
    return 0


def _tokenizer(args) -> int:
    from .data.tokenizer import corpus_texts, train_bpe

    tok = train_bpe(corpus_texts(args.corpus), args.vocab_size, args.out, split_capitals=args.split_capitals)
    print(f"trained a byte-level BPE with {tok.get_vocab_size()} tokens -> {args.out}/tokenizer.json")
    return 0


def _synth(args) -> int:
    from .data.synth import TASKS, generate_splits

    if args.tasks:
        unknown = sorted(set(args.tasks) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; known: {sorted(TASKS)}")
    n_eval = args.n_eval if args.n_eval is not None else max(1, args.n // 10)
    out = generate_splits(args.out, args.n, n_eval, n_eval, seed=args.seed, tasks=args.tasks,
                          image_size=args.image_size, workers=args.workers, progress=True)
    for split, summary in out.items():
        print(f"{split}: {summary['n']} samples -> {summary['jsonl']}")
    return 0


def _train(args) -> int:
    from .train.run import describe, train_recipe

    if args.dry_run:
        from .train.run import build_run

        print(describe(build_run(args.recipe, args.overrides)))
        return 0
    from . import distributed as D

    _tune_malloc()
    final = train_recipe(args.recipe, args.overrides, resume=args.resume)
    if D.is_main():
        print(f"final model: {final}")
    return 0


def _plot(args) -> int:
    from .train.plot import plot_run

    print(f"wrote {plot_run(args.run_dir, args.out)}")
    return 0


def _soup(args) -> int:
    from .train.soup import soup

    out = soup(args.models, args.out, weights=args.weights, overwrite=args.overwrite)
    print(f"averaged {len(args.models)} checkpoints -> {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sailvl", description="Train, serve and evaluate SAIL-VL2-style VLMs.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", help="the whole system on a CPU: synthetic data -> all training stages -> eval -> chat")
    d.add_argument("--out", default="runs", help="runs directory (default: runs; the run is runs/demo)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (time vs accuracy)")
    d.add_argument("--minutes", type=float, default=15.0,
                   help="wall-clock budget for the whole demo: stages are cut to end within it on this machine at "
                        "its speed now, or in a fast hour the VLM stages run up to 2x their steps (default 15; 0: "
                        "no budget, the recipe as is)")
    d.add_argument("--quick", action="store_true", help="a one-minute smoke run (tiny data, a few steps)")
    d.add_argument("--resume", action="store_true", help="continue an interrupted demo run")
    d.add_argument("--procs", type=int, default=1,
                   help="training processes under torchrun (ddp, one thread each); 1 = in this process")
    d.set_defaults(func=_demo)

    conv = sub.add_parser("convert", help="checkpoint conversions")
    conv_sub = conv.add_subparsers(dest="convert_command", metavar="KIND", required=True)
    c = conv_sub.add_parser("compose", help="AIMv2 vision dir + Qwen3/Qwen3-MoE LLM dir -> SAIL-VL2 model dir")
    c.add_argument("--vision", required=True, help="transformers AIMv2 directory (config.json + safetensors)")
    c.add_argument("--llm", required=True, help="transformers Qwen3 or Qwen3-MoE directory with tokenizer files")
    c.add_argument("--out", required=True, help="output SAIL-VL2 model directory")
    c.add_argument("--select-layer", type=int, default=-1, help="ViT hidden state fed to the adapter (default -1)")
    c.add_argument("--max-dynamic-patch", type=int, default=None, help="max tiles per image (default 10)")
    c.add_argument("--seed", type=int, default=0, help="seed of the adapter's random init")
    c.set_defaults(func=_compose)

    tr = sub.add_parser("train", help="train a recipe (all its stages); torchrun for several processes")
    tr.add_argument("recipe", help="recipe name: tiny, sailvl2_2b, sailvl2_8b, sailvl2_a3b")
    tr.add_argument("overrides", nargs="*", help="key=value: recipe arguments (e.g. scale=0.5) or dotted run "
                    "config keys (e.g. stages.sft.steps=20, seed=1)")
    tr.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    tr.add_argument("--dry-run", action="store_true", help="build and validate the run, print shapes and sizes")
    tr.set_defaults(func=_train)

    pl = sub.add_parser("plot", help="loss / lr / throughput curves of a run to PNG")
    pl.add_argument("run_dir", help="a run directory (with metrics.jsonl)")
    pl.add_argument("--out", default=None, help="PNG path (default RUN_DIR/curves.png)")
    pl.set_defaults(func=_plot)

    so = sub.add_parser("soup", help="model soup: average homologous checkpoints (same config)")
    so.add_argument("models", nargs="+", help="SAIL-VL2 model directories")
    so.add_argument("--out", required=True, help="output model directory")
    so.add_argument("--weights", nargs="+", type=float, default=None, help="per-model weights (default: equal)")
    so.add_argument("--overwrite", action="store_true", help="allow a non-empty output directory")
    so.set_defaults(func=_soup)

    data = sub.add_parser("data", help="data tools: tokenizer training, synthetic world")
    data_sub = data.add_subparsers(dest="data_command", metavar="TOOL", required=True)
    t = data_sub.add_parser("tokenizer", help="train a byte-level BPE with the SAIL-VL2 special tokens")
    t.add_argument("--corpus", nargs="+", required=True, help=".txt files (lines) or .jsonl conversation files")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--out", required=True, help="output directory (tokenizer.json + tokenizer_config.json)")
    t.add_argument("--split-capitals", action="store_true",
                   help="never merge runs of capital letters (letter codes: OCR answers, chart / table labels)")
    t.set_defaults(func=_tokenizer)
    sy = data_sub.add_parser("synth", help="generate the built-in synthetic visual world (train / val / test)")
    sy.add_argument("--out", required=True, help="output directory (train.jsonl, val.jsonl, test.jsonl, images/)")
    sy.add_argument("--n", type=int, required=True, help="training samples")
    sy.add_argument("--n-eval", type=int, default=None, help="validation and test samples each (default n/10)")
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--tasks", nargs="+", default=None, help="subset of task names (default: all)")
    sy.add_argument("--image-size", type=int, default=64)
    sy.add_argument("--workers", type=int, default=None,
                    help="processes drawing the samples (default: one per CPU; the same files whatever the number)")
    sy.set_defaults(func=_synth)

    # Subcommands that live with their subsystem: each module's add_parsers(sub) registers its own.
    from .eval.cli import add_parsers as _eval_parsers
    from .serve.cli import add_parsers as _serve_parsers

    _serve_parsers(sub)
    _eval_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # `key=value` overrides may follow flags (`sailvl train tiny --resume scale=0.5`)
        if getattr(args, "command", None) == "train" and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"sailvl {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
