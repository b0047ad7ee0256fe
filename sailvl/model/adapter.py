"""Vision-language adapter: 2x2 pixel shuffle (InternVL "v2" ordering) then LayerNorm -> Linear -> GELU -> Linear.

Letters: N images, h/w patch grid, D ViT width, E LLM width.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# frequencies per axis of the visual position code (`position_code`)
POSITION_FREQS = 8


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


def position_code(h: int, w: int, width: int, freqs: int = POSITION_FREQS) -> torch.Tensor:
    """[h*w, width] fixed 2-D code of each token's place in its (h x w) grid, row-major: sin and cos of the row
    and of the column at `freqs` frequencies each (k * pi / 2 per grid height / width, k = 1..freqs: fractions
    of the image, so grids of any size share one scale) in the first 4 * freqs channels, zeros after, scaled to
    unit RMS over `width`. On the tiny recipe's 4 x 4 token grid the top frequencies alias (alternate between
    neighbours); a smooth code (phases up to pi) measured the same in the demo (demo log, session 16)."""
    n = 4 * freqs
    if width < n:
        raise ValueError(f"the visual position code needs an LLM width >= {n}, got {width}")
    k = torch.arange(1, freqs + 1, dtype=torch.float32) * math.pi / 2
    r = (torch.arange(h, dtype=torch.float32) / h).repeat_interleave(w)[:, None] * k
    c = (torch.arange(w, dtype=torch.float32) / w).repeat(h)[:, None] * k
    code = torch.zeros(h * w, width)
    code[:, :n] = torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], 1)
    return code * math.sqrt(width / n) / math.sqrt(0.5)  # sin^2 + cos^2 = 1 per pair: mean square 0.5 per channel


def adapt(mlp1: nn.Sequential, feats_NTD: torch.Tensor, grid: tuple[int, int], scale: float = 0.5,
          position: float = 0.0) -> torch.Tensor:
    """ViT features of N same-grid images [N, h*w, D] -> LLM tokens [N, h*w*scale^2, E].

    `position` > 0 adds `position_code` of each token's place in the shuffled grid, times `position` and the
    token's own RMS (so the code keeps its share of the token whatever scale the adapter learns). SAIL-VL2 has
    no such code (0, the default): its pretrained tower's features already say where each patch is, while a
    tower trained from scratch for minutes does not (SailVLConfig.visual_position_code)."""
    N, T, D = feats_NTD.shape
    h, w = grid
    if h * w != T:
        raise ValueError(f"{T} tokens do not form a {h}x{w} grid")
    x = pixel_shuffle(feats_NTD.reshape(N, h, w, D), scale)
    out = mlp1(x.reshape(N, -1, x.shape[-1]))
    if position:
        code = position_code(x.shape[1], x.shape[2], out.shape[-1]).to(out.device, out.dtype)
        rms = out.detach().float().pow(2).mean(-1, keepdim=True).sqrt().to(out.dtype)
        out = out + position * rms * code
    return out
