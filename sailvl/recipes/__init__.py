"""Recipes: Python functions returning full `RunConfig`s (stages as data).

  tiny         the CPU demo: a few-million-parameter SAIL-VL2 on the built-in synthetic world, every stage
  sailvl2_2b   SAIL-ViT-Huge (AIMv2) + Qwen3-1.7B, the paper's stage list
  sailvl2_8b   SAIL-ViT-Huge + Qwen3-8B
  sailvl2_a3b  SAIL-ViT-Huge + Qwen3-30B-A3B (MoE)

`get_recipe(name)(**kwargs)` builds one; `prepare(run)` creates what a recipe needs locally (the tiny
recipe's synthetic data and tokenizer); the big recipes point at data the user provides.
"""

from __future__ import annotations

import difflib

from .published import sailvl2_2b, sailvl2_8b, sailvl2_a3b
from .tiny import prepare_tiny, tiny

RECIPES = {"tiny": tiny, "sailvl2_2b": sailvl2_2b, "sailvl2_8b": sailvl2_8b, "sailvl2_a3b": sailvl2_a3b}
PREPARE = {"tiny": prepare_tiny}


def get_recipe(name: str):
    if name not in RECIPES:
        close = difflib.get_close_matches(name, RECIPES, n=2)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown recipe {name!r}{hint} (known: {', '.join(RECIPES)})")
    return RECIPES[name]


__all__ = ["RECIPES", "PREPARE", "get_recipe", "tiny", "sailvl2_2b", "sailvl2_8b", "sailvl2_a3b"]
