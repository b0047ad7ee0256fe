"""Does the tiny LLM learn in-context lookup, and what data teaches it? Ours and transformers' Qwen3 side by side.

A lookup: "K1 : V1 , K2 : V2 , K3 : V3 . Q =" -> the value of key Q (3 random keys of 26, distinct values of 9, one
token each; chance 1/3 among the listed values). A transformer answers it with an induction circuit (one head
marks each value with the key before it, a later one finds the queried key's mark and copies the value). The tiny
recipe's LLM shape (4 layers of 256, tied embeddings, a 64-token vocabulary here) trains on batches of 32 in three
mixtures:

  lookups        every sample a lookup, the loss on its answer;
  with_repeats   half the samples a lookup, half a random run of 4-12 tokens repeated once, the loss on the repeat
                 (the classic data on which induction heads form);
  spaced_with_repeats  the same with one more token between key and value ("K : _ V"), as Qwen's pre-tokenization
                 splits "K: 5" (the space before a digit is a token of its own).

Both models start from the same weights (PyTorch's module defaults, or `--init recipe`: the tiny recipe's N(0, 0.06))
and see the same batches with the recipe's Muon (or `--optimizer adamw`), lr 1e-3; accuracy is on 1,000 held-out
lookups. Measured on the 2-core CPU (600 steps, ~1.5 minutes a run), ours / transformers': lookups alone 0.33 / 0.33;
with repeats 0.99 / 0.97; spaced 0.74/0.75; with the recipe's init the repeats do not teach them by 600 steps (demo log,
session 26). The model can look up; what forms the circuit is the data and the initial weights.

`--opening N` puts the same N tokens before every sample, as the chat template's `<|im_start|>user\n` opens every
sample of the synthetic world: the circuit then forms later (with repeats, `--opening 3 --steps 1200`, ours /
transformers': 0.37 / 0.36 at 600 steps, 0.47 / 1.00 at 800, 0.99 / 0.95 at 1,000, 1.00 / 1.00 at 1,200; demo log,
session 27).

Run: .venv/bin/python benchmarks/induction.py [--steps 600] [--every 200] [--optimizer muon|adamw] [--init torch|recipe]
     [--mixtures lookups,with_repeats,spaced_with_repeats] [--opening 0-3]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import print_table  # noqa: E402

VOCAB = 64
KEYS, VALUES = range(0, 26), range(26, 35)
COLON, COMMA, DOT, EQ, PAD, SPACE = 35, 36, 37, 38, 39, 40
OPENING = (41, 42, 43)  # --opening N: the first N open every sample, as `<|im_start|>user\n` opens every chat sample
MIXTURES = ("lookups", "with_repeats", "spaced_with_repeats")
IGNORE = -100


def lookup(rng: random.Random, spaced: bool = False) -> tuple[list[int], list[int]]:
    """(tokens, targets): targets[i] is the token position i must predict at i - 1 (IGNORE: no loss). `spaced`: a
    token between the colon / equals sign and the value, as Qwen's pre-tokenization gives "K: 5" (K, :, space, 5)."""
    keys, values = rng.sample(KEYS, 3), rng.sample(VALUES, 3)
    gap = [SPACE] if spaced else []
    seq = []
    for i, (k, v) in enumerate(zip(keys, values)):
        seq += [k, COLON, *gap, v, COMMA if i < 2 else DOT]
    q = rng.randrange(3)
    seq += [keys[q], EQ, *gap, values[q]]
    return seq, [IGNORE] * (len(seq) - 1) + [values[q]]


def repeat(rng: random.Random) -> tuple[list[int], list[int]]:
    run = [rng.randrange(0, 35) for _ in range(rng.randint(4, 12))]
    return run + [DOT] + run, [IGNORE] * (len(run) + 1) + run


def opened(item: tuple[list[int], list[int]], opening: int) -> tuple[list[int], list[int]]:
    """The sample with the first `opening` tokens of OPENING before it (untrained)."""
    return list(OPENING[:opening]) + item[0], [IGNORE] * opening + item[1]


def batch(rng: random.Random, n: int, mixture: str, opening: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    spaced = mixture.startswith("spaced")
    items = [opened(repeat(rng) if mixture.endswith("with_repeats") and i % 2 else lookup(rng, spaced), opening)
             for i in range(n)]
    L = max(len(s) for s, _ in items)
    x, y = torch.full((n, L), PAD), torch.full((n, L), IGNORE)
    for i, (s, t) in enumerate(items):
        x[i, :len(s)], y[i, :len(t)] = torch.tensor(s), torch.tensor(t)
    return x, y


def models(seed: int, init: str = "torch"):
    """Ours and transformers' Qwen3 with the tiny recipe's LLM shape and the same initial weights: PyTorch's
    module defaults ("torch": embeddings N(0, 1), linears uniform +-1/sqrt(fan_in)) or the recipe's ("recipe":
    everything N(0, 0.06), as `SailVL.init_weights` draws a fresh LLM)."""
    from transformers import Qwen3Config
    from transformers import Qwen3ForCausalLM as HFQwen3

    from sailvl.model.llm import Qwen3ForCausalLM
    from sailvl.recipes.tiny import tiny_model

    cfg = tiny_model(vocab_size=VOCAB).llm_config
    torch.manual_seed(seed)
    ours = Qwen3ForCausalLM(cfg)
    if init == "recipe":
        from sailvl.model.vlm import SailVL

        SailVL._init_modules(ours, cfg.initializer_range)
    ref = HFQwen3(Qwen3Config(vocab_size=VOCAB, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                              num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                              num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                              rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=True,
                              attn_implementation="sdpa"))
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"weights do not map: missing {missing}, unexpected {unexpected}")
    return {"sailvl": ours, "transformers": ref}


def optimizer(model, name: str) -> torch.optim.Optimizer:
    """The recipe's Muon (hidden matrices; embeddings and norms with AdamW) or AdamW, lr 1e-3, no weight decay."""
    from sailvl.train.muon import MuonAdamW, use_muon

    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    groups: dict[bool, list] = {}
    for n, p in model.named_parameters():
        groups.setdefault(use_muon(n, p), []).append(p)
    return MuonAdamW([{"params": ps, "muon": m, "lr": 1e-3, "weight_decay": 0.0} for m, ps in groups.items()],
                     betas=(0.9, 0.95))


def train(model, mixture: str, steps: int, every: int, test, opt_name: str, opening: int = 0) -> list[float]:
    """Held-out lookup accuracy every `every` steps."""
    opt = optimizer(model, opt_name)
    rng, curve = random.Random(0), []
    for step in range(1, steps + 1):
        x, y = batch(rng, 32, mixture, opening)
        logits = model(input_ids=x).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), y[:, 1:].reshape(-1), ignore_index=IGNORE)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0:
            with torch.no_grad():
                curve.append((model(input_ids=test[0]).logits[:, -1].argmax(-1) == test[1]).float().mean().item())
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--every", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--optimizer", choices=("muon", "adamw"), default="muon", help="muon: the tiny recipe's")
    ap.add_argument("--init", choices=("torch", "recipe"), default="torch", help="initial weights (see models)")
    ap.add_argument("--mixtures", default=",".join(MIXTURES), help=f"comma-separated, of {', '.join(MIXTURES)}")
    ap.add_argument("--opening", type=int, default=0, choices=range(len(OPENING) + 1),
                    help="the same N tokens open every sample (train and held out)")
    args = ap.parse_args()
    mixtures = [m for m in args.mixtures.split(",") if m]
    if not set(mixtures) <= set(MIXTURES):
        raise SystemExit(f"--mixtures: unknown {sorted(set(mixtures) - set(MIXTURES))}; known: {', '.join(MIXTURES)}")
    rows = []
    for mixture in mixtures:
        held = [opened(lookup(random.Random(10_000 + i), mixture.startswith("spaced")), args.opening)
                for i in range(1000)]
        test = (torch.tensor([s[:-1] for s, _ in held]), torch.tensor([t[-1] for _, t in held]))
        for name, model in models(args.seed, args.init).items():
            t0 = time.perf_counter()
            curve = train(model, mixture, args.steps, args.every, test, args.optimizer, args.opening)
            print(f"[induction] {mixture} {name}: {curve} ({time.perf_counter() - t0:.0f} s)", flush=True)
            rows.append([mixture, name, *curve])
    steps = [str(s) for s in range(args.every, args.steps + 1, args.every)]
    title = f"held-out lookup accuracy by training step ({args.optimizer}, {args.init} init, opening {args.opening}"
    print_table(title + "; chance 0.33)", ["mixture", "model", *steps], rows)
    for mixture in mixtures:
        ours, ref = (r[-1] for r in rows if r[0] == mixture)
        print(f"{mixture}: ours / transformers at step {args.steps}: {ours:.3f} / {ref:.3f}")


if __name__ == "__main__":
    main()
