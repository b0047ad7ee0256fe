"""The `sailvl` command. Subcommands are thin: they parse flags and call library functions."""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from .demo import run

    rows = run(args.out, seed=args.seed)
    return 0 if all(r["reload_exact"] for r in rows) else 1


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

    tok = train_bpe(corpus_texts(args.corpus), args.vocab_size, args.out)
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
                          image_size=args.image_size)
    for split, summary in out.items():
        print(f"{split}: {summary['n']} samples -> {summary['jsonl']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sailvl", description="Train, serve and evaluate SAIL-VL2-style VLMs.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", help="build, save, reload and generate from tiny models (CPU, seconds)")
    d.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    d.add_argument("--seed", type=int, default=0)
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

    data = sub.add_parser("data", help="data tools: tokenizer training, synthetic world")
    data_sub = data.add_subparsers(dest="data_command", metavar="TOOL", required=True)
    t = data_sub.add_parser("tokenizer", help="train a byte-level BPE with the SAIL-VL2 special tokens")
    t.add_argument("--corpus", nargs="+", required=True, help=".txt files (lines) or .jsonl conversation files")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--out", required=True, help="output directory (tokenizer.json + tokenizer_config.json)")
    t.set_defaults(func=_tokenizer)
    sy = data_sub.add_parser("synth", help="generate the built-in synthetic visual world (train / val / test)")
    sy.add_argument("--out", required=True, help="output directory (train.jsonl, val.jsonl, test.jsonl, images/)")
    sy.add_argument("--n", type=int, required=True, help="training samples")
    sy.add_argument("--n-eval", type=int, default=None, help="validation and test samples each (default n/10)")
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--tasks", nargs="+", default=None, help="subset of task names (default: all)")
    sy.add_argument("--image-size", type=int, default=64)
    sy.set_defaults(func=_synth)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"sailvl {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
