"""Vision-language adapter: 2x2 pixel shuffle (InternVL "v2" ordering) then LayerNorm -> Linear -> GELU -> Linear.

Letters: N images, h/w patch grid, D ViT width, E LLM width.
"""

from __future__ import annotations

import torch
from torch import nn


def pixel_shuffle(x_NhwD: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    """[N, h, w, D] -> [N, h*scale, w*scale, D/scale^2], InternVL ps_version v2.

    For square grids this is InternVL's function exactly; written with explicit h/w so that the
    non-square grids of native-resolution images shuffle 2x2 neighbourhoods too. Channel order of an
    output token: (row 2i, cols 2j..2j+1), (row 2i+1, cols 2j..2j+1)."""
    N, h, w, D = x_NhwD.shape
    r = int(round(1 / scale))
    if h % r or w % r:
        raise ValueError(f"patch grid {h}x{w} is not divisible by the pixel-shuffle factor {r}")
    x = x_NhwD.reshape(N, h, w // r, D * r)  # merge column pairs
    x = x.permute(0, 2, 1, 3).reshape(N, w // r, h // r, D * r * r)  # merge row pairs
    return x.permute(0, 2, 1, 3).contiguous()


def make_mlp1(vit_width: int, llm_width: int, scale: float = 0.5) -> nn.Sequential:
    """`mlp1` with the checkpoint's indices: 0 LayerNorm, 1 Linear, 2 GELU, 3 Linear."""
    d_in = int(vit_width / scale**2)
    return nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, llm_width), nn.GELU(), nn.Linear(llm_width, llm_width))


def adapt(mlp1: nn.Sequential, feats_NTD: torch.Tensor, grid: tuple[int, int], scale: float = 0.5) -> torch.Tensor:
    """ViT features of N same-grid images [N, h*w, D] -> LLM tokens [N, h*w*scale^2, E]."""
    N, T, D = feats_NTD.shape
    h, w = grid
    if h * w != T:
        raise ValueError(f"{T} tokens do not form a {h}x{w} grid")
    x = pixel_shuffle(feats_NTD.reshape(N, h, w, D), scale)
    return mlp1(x.reshape(N, -1, x.shape[-1]))
