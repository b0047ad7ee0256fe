"""Serving: generated tokens/s through our OpenAI-compatible server at concurrency 1, 4 and 16 (goal: 16
concurrent >= 4x single-stream); single-stream decode tokens/s of the engine vs transformers `generate` on
the same Qwen3 weights (goal >= 1.5x); time to first token of one image request (server vs in-process).

The server runs as `sailvl serve` in its own process; the clients are threads of this one.

Run: .venv/bin/python benchmarks/bench_serve.py [--quick]
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_decode import build
from benchmarks.common import QWEN3_CONFIGS, compare, print_table
from sailvl.data.processor import Processor, ProcessorConfig
from sailvl.data.tokenizer import token_id, train_bpe
from sailvl.serve.engine import Engine
from sailvl.serve.sampling import SamplingParams
from sailvl.serve.server import wait_healthy

MODEL = "bench"


def make_engine(name: str, workdir: Path) -> tuple[Engine, object, Path]:
    """The Qwen3 config `name` (weights shared with a transformers model) + a tiny ViT, with a tokenizer,
    also saved as a model directory for the server process."""
    hf, model = build(name)
    tok = train_bpe(["a picture of a red circle and a blue square, the answer is 42"] * 50, 400, workdir / "tok")
    model.config.img_context_token_id = token_id(tok, "<IMG_CONTEXT>")
    proc = Processor(tok, ProcessorConfig(image_size=64, patch_size=8, max_dynamic_patch=6))
    model_dir = workdir / "model"
    model.save_pretrained(model_dir)
    proc.save_pretrained(model_dir, source_dir=workdir / "tok")
    return Engine(model, proc, max_seqs=16), hf, model_dir


@contextmanager
def server_process(model_dir: Path, threads: int):
    """`sailvl serve` in its own process (its own GIL, as in production); yields the base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "sailvl", "serve", "--model", str(model_dir), "--port", str(port),
                             "--served-model-name", MODEL, "--max-seqs", "16"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, timeout=300, alive=lambda: proc.poll() is None)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def request(client: httpx.Client, prompt: str, new: int, **extra) -> int:
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": new,
            "temperature": 0, "ignore_eos": True, **extra}
    r = client.post("/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"]


def throughput(url: str, concurrency: int, per_client: int, new: int) -> float:
    """Generated tokens/s with `concurrency` clients each sending `per_client` requests back to back."""
    totals = [0] * concurrency

    def client_loop(i: int) -> None:
        with httpx.Client(base_url=url) as c:
            for j in range(per_client):
                totals[i] += request(c, f"Describe picture {i}-{j} of a red circle.", new)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(totals) / (time.perf_counter() - t0)


def time_to_first_token(url: str, image_url: str) -> float:
    body = {"model": MODEL, "stream": True, "max_tokens": 4, "temperature": 0, "logprobs": True,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                      {"type": "text", "text": "What is in the picture?"}]}]}
    t0 = time.perf_counter()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if '"logprobs":{' in line.replace(" ", ""):  # the first chunk that carries a token
                return time.perf_counter() - t0
    raise RuntimeError("no token arrived")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--config", default="tiny", choices=sorted(QWEN3_CONFIGS))
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads here and in the server (default: torch's); 1 avoids stalls on a busy machine")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    new = 32 if args.quick else 64
    with tempfile.TemporaryDirectory() as d:
        engine, hf, model_dir = make_engine(args.config, Path(d))

        # single-stream decode, in process: engine vs transformers, same weights, same prompt
        prompt_len, dec_new = 64, 128
        prompt = torch.randint(0, QWEN3_CONFIGS[args.config]["vocab_size"], (1, prompt_len))

        def run_hf():
            return hf.generate(prompt, max_new_tokens=dec_new, min_new_tokens=dec_new, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, prompt_len:].tolist()

        def run_engine():
            return engine.generate(prompt[0].tolist(), SamplingParams(max_new_tokens=dec_new, ignore_eos=True)) \
                .choices[0].token_ids

        with torch.no_grad():
            same = run_hf() == run_engine()
            t = compare({"hf": run_hf, "engine": run_engine}, warmup=1, repeat=3 if args.quick else 5)
        decode_rows = [[args.config, f"{prompt_len}+{dec_new}", dec_new / t["hf"], dec_new / t["engine"],
                        t["hf"] / t["engine"], same]]

        # through the server
        buf = io.BytesIO()
        Image.new("RGB", (300, 200), (200, 40, 40)).save(buf, format="PNG")
        image_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        with server_process(model_dir, args.threads) as url:
            with httpx.Client(base_url=url) as c:
                request(c, "warm up", 4)
            rates = {}
            for conc in (1, 4, 16):
                rates[conc] = throughput(url, conc, 2 if args.quick else 4, new)
            ttft_server = min(time_to_first_token(url, image_url) for _ in range(3))
        p = engine.prepare([{"role": "user", "content": "<image>\nWhat is in the picture?"}],
                           [Image.open(io.BytesIO(buf.getvalue()))])
        t0 = time.perf_counter()
        for _ in range(3):
            engine.generate(p, SamplingParams(max_new_tokens=1))
        ttft_engine = (time.perf_counter() - t0) / 3

    print_table("Single-stream decode, greedy, fp32, tokens/s incl. prefill (goal: engine >= 1.5x transformers)",
                ["config", "prompt+new", "transformers generate", "sailvl engine", "ratio", "same tokens"],
                decode_rows)
    print_table(f"Server throughput, {new} new tokens per request, generated tokens/s (goal: c16 >= 4x c1)",
                ["concurrency", "tokens/s", "ratio vs c1"], [[c, r, r / rates[1]] for c, r in rates.items()])
    print_table(f"Time to first token, one image request ({p.num_image_tokens} image tokens), seconds",
                ["path", "seconds"], [["server (HTTP, image decode + tiling, prefill)", ttft_server],
                                      ["engine in-process (prefill + 1 token)", ttft_engine]])


if __name__ == "__main__":
    main()
