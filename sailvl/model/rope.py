"""Rotary position embeddings: 1D for the Qwen3 decoder, 2D (row / column halves) for the native-res ViT.

Letters: B batch, L sequence, H heads, K head dim, N packed tokens.
cos/sin are computed in fp32 from integer positions (as transformers does) and cast to the activations' dtype.
"""

from __future__ import annotations

import torch


def inv_freq(dim: int, theta: float, device=None) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))


def rope_cos_sin(pos_BL: torch.Tensor, dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [B, L, dim] for integer (or fractional) positions [B, L]."""
    freqs_BLk = pos_BL.float()[..., None] * inv_freq(dim, theta, pos_BL.device)
    emb_BLK = torch.cat([freqs_BLk, freqs_BLk], dim=-1)
    return emb_BLK.cos().to(dtype), emb_BLK.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x_BHLK: torch.Tensor, cos_BLK: torch.Tensor, sin_BLK: torch.Tensor) -> torch.Tensor:
    cos, sin = cos_BLK[:, None], sin_BLK[:, None]
    return x_BHLK * cos + rotate_half(x_BHLK) * sin


def rope2d_cos_sin(
    rows_N: torch.Tensor, cols_N: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """2D RoPE tables [1, N, head_dim]: the first half of the head dim rotates with the patch row,
    the second half with the patch column (each half is an ordinary rotate-half RoPE of dim K/2)."""
    half = head_dim // 2
    cos_r, sin_r = rope_cos_sin(rows_N[None], half, theta, torch.float32)
    cos_c, sin_c = rope_cos_sin(cols_N[None], half, theta, torch.float32)
    return torch.cat([cos_r, cos_c], -1).to(dtype), torch.cat([sin_r, sin_c], -1).to(dtype)


def apply_rope2d(x_BHNK: torch.Tensor, cos_BNK: torch.Tensor, sin_BNK: torch.Tensor) -> torch.Tensor:
    half = x_BHNK.shape[-1] // 2
    xr, xc = x_BHNK[..., :half], x_BHNK[..., half:]
    cr, cc = cos_BNK[..., :half], cos_BNK[..., half:]
    sr, sc = sin_BNK[..., :half], sin_BNK[..., half:]
    return torch.cat([apply_rope(xr, cr, sr), apply_rope(xc, cc, sc)], dim=-1)


def grid_positions(h: int, w: int, max_grid: int | None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major (row, col) positions of an h x w patch grid. With `max_grid`, grids larger than it are
    interpolated: positions are scaled so the longest side spans the trained range [0, max_grid)."""
    rows = torch.arange(h, device=device).repeat_interleave(w).float()
    cols = torch.arange(w, device=device).repeat(h).float()
    if max_grid is not None and max(h, w) > max_grid:
        scale = max_grid / max(h, w)
        rows, cols = rows * scale, cols * scale
    return rows, cols
