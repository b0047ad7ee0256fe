"""`sailvl chat`, `sailvl caption` and `sailvl serve` (registered by sailvl.cli)."""

from __future__ import annotations

import argparse
import os
import sys


def _sampling_flags(p: argparse.ArgumentParser, max_new: int | None) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new,
                   help="new tokens per answer (default: 1024, 4096 with --think)" if max_new is None else
                   f"new tokens per answer (default {max_new})")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a SAIL-VL2 model directory")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: bf16 on CUDA, else fp32)")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")


def _params(args):
    from .sampling import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed)


def _chat(args) -> int:
    from .chat import ChatSession, interactive
    from .server import load_engine

    params = _params(args)
    with load_engine(args.model, args.dtype, args.device) as engine:
        session = ChatSession(engine, params, thinking=args.think, system=args.system, video=args.video)
        for image in args.image or []:
            session.attach(image)
        if args.prompt is None:
            interactive(session)
            return 0
        choice = session.ask(args.prompt, sys.stdout)
        print()
        if args.think and choice.answer is not None:
            print(f"[answer] {choice.answer}")
    return 0


def _caption(args) -> int:
    from .chat import caption_folder
    from .server import load_engine

    with load_engine(args.model, args.dtype, args.device, max_seqs=max(args.batch_size, 1)) as engine:
        s = caption_folder(engine, args.images_dir, args.out, args.prompt, _params(args), in_flight=args.batch_size)
    print(f"captioned {s['captioned']} images, skipped {s['skipped']} already in {s['out']}, "
          f"failed {len(s['failed'])}")
    for key, why in s["failed"]:
        print(f"  failed: {key}: {why}")
    return 0


def _serve(args) -> int:
    try:
        from .server import serve
    except ImportError as e:
        raise ImportError(f"`sailvl serve` needs the serve extra (pip install 'sailvl[serve]'): {e}") from None

    serve(args.model, args.host, args.port, api_key=args.api_key, served_model_name=args.served_model_name,
          allow_remote_images=args.allow_remote_images, allow_local_files=args.allow_local_files,
          max_body_mb=args.max_body_mb, max_images=args.max_images, max_image_pixels=args.max_image_pixels,
          max_n=args.max_n, max_seqs=args.max_seqs, max_cached_tokens=args.max_cached_tokens, dtype=args.dtype,
          device=args.device)
    return 0


def add_parsers(sub) -> None:
    """Register this subsystem's subcommands on the top-level subparsers."""
    c = sub.add_parser("chat", help="chat with a model: one-shot with PROMPT, else interactive (streams answers)")
    _model_flags(c)
    c.add_argument("prompt", nargs="?", default=None, help="the question (omit for an interactive session)")
    c.add_argument("--image", action="append", help="an image for the first question (repeatable)")
    c.add_argument("--video", default=None, help="a video file or a folder of frames")
    c.add_argument("--think", action="store_true", help="thinking mode: reason in <think>, answer in \\boxed{}")
    c.add_argument("--system", default=None, help="system prompt")
    _sampling_flags(c, None)
    c.set_defaults(func=_chat)

    cap = sub.add_parser("caption", help="caption every image in a folder into JSONL (resumable)")
    _model_flags(cap)
    cap.add_argument("images_dir", help="folder of images (searched recursively)")
    cap.add_argument("--out", required=True, help="output JSONL; images already captioned in it are skipped")
    cap.add_argument("--prompt", default="Describe this image in detail.")
    cap.add_argument("--batch-size", type=int, default=8, help="images in flight at once (default 8)")
    _sampling_flags(cap, 256)
    cap.set_defaults(func=_caption)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a chat page at /")
    _model_flags(s)
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=os.environ.get("SAILVL_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $SAILVL_API_KEY, else no key)")
    s.add_argument("--served-model-name", default=None, help="the model id clients use (default: the folder name)")
    s.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs")
    s.add_argument("--allow-local-files", action="store_true", help="read image paths / file:// URLs on this machine")
    s.add_argument("--max-body-mb", type=float, default=32, help="request body limit in MiB (default 32)")
    s.add_argument("--max-images", type=int, default=8, help="images per request (default 8)")
    s.add_argument("--max-image-pixels", type=int, default=40_000_000, help="pixels per image (default 40M)")
    s.add_argument("--max-n", type=int, default=8, help="largest n (choices per request)")
    s.add_argument("--max-seqs", type=int, default=16, help="sequences decoded at once (default 16)")
    s.add_argument("--max-cached-tokens", type=int, default=65536, help="KV cache budget in tokens (default 65536)")
    s.set_defaults(func=_serve)
