"""Rotary position embeddings: 1D for the Qwen3 decoder, 2D (row / column halves) for the native-res ViT.

Letters: B batch, L sequence, H heads, K head dim, k = K/2, N packed tokens.
cos/sin are computed in fp32 from integer positions (as transformers does) and cast to the activations' dtype.

The decoder uses `rope_tables` (fp32 cos/sin of the K/2 frequencies only: rotate-half RoPE repeats them for both
halves) and `norm_rope`, the per-head q/k RMSNorm and the rotation as one autograd Function: the rotation runs on
the two halves in place of rotate_half's neg + cat, the norm weight is folded into the (per-token, not per-head)
tables, and the result is written once in the dtype attention consumes. Same maths as
`apply_rope(q_norm(x), *rope_cos_sin(...))` up to fp32 rounding, in about half the passes over memory.
"""

from __future__ import annotations

import torch

from .norm import needs_grad, rms_norm_backward, rstd_fp32


def inv_freq(dim: int, theta: float, device=None) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))


def rope_cos_sin(pos_BL: torch.Tensor, dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [B, L, dim] for integer (or fractional) positions [B, L]."""
    freqs_BLk = pos_BL.float()[..., None] * inv_freq(dim, theta, pos_BL.device)
    emb_BLK = torch.cat([freqs_BLk, freqs_BLk], dim=-1)
    return emb_BLK.cos().to(dtype), emb_BLK.sin().to(dtype)


def rope_tables(pos_BL: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos, sin [B, L, dim/2] of the rotate-half RoPE frequencies (rope_cos_sin's tables are these twice)."""
    freqs_BLk = pos_BL.float()[..., None] * inv_freq(dim, theta, pos_BL.device)
    return freqs_BLk.cos(), freqs_BLk.sin()


def _rotate(out: torch.Tensor, x: torch.Tensor, c1, s1, c2, s2) -> torch.Tensor:
    """out = [x1*c1 - x2*s1, x2*c2 + x1*s2] over the halves of the last dim (fp32, out preallocated)."""
    x1, x2 = x.chunk(2, -1)
    if torch.compiler.is_compiling():  # inductor (2.13, dynamic shapes) fails on out= into slices; it fuses this
        return torch.cat([torch.addcmul(x1 * c1, x2, s1, value=-1), torch.addcmul(x2 * c2, x1, s2)], -1)
    o1, o2 = out.chunk(2, -1)
    torch.mul(x1, c1, out=o1).addcmul_(x2, s1, value=-1)
    torch.mul(x2, c2, out=o2).addcmul_(x1, s2)
    return out


def _norm_rope_fwd(x, weight, eps, cos, sin, out_dtype):
    """(output, fp32 normalised value, rstd, fp32 tables [B, L, 1, k]); no op here is one autocast would recast."""
    x32 = x.float()
    rstd = rstd_fp32(x32, eps)
    xn = x32 * rstd
    if x.dtype != torch.float32:  # the reference rounds the normalised value to x's dtype before scaling
        xn = xn.to(x.dtype).float()
    w1, w2 = weight.float().chunk(2)
    c, s = cos.float().unsqueeze(-2), sin.float().unsqueeze(-2)  # [B, L, 1, k]: shared by the heads
    # rope(w * xn) with w folded into the tables: [xn1*w1*c - xn2*w2*s, xn2*w2*c + xn1*w1*s]
    out = _rotate(torch.empty_like(xn), xn, c * w1, s * w2, c * w2, s * w1)
    return out.to(out_dtype or torch.promote_types(x.dtype, weight.dtype)), xn, rstd, c, s


class _NormRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, cos, sin, out_dtype):
        out, xn, rstd, c, s = _norm_rope_fwd(x, weight, eps, cos, sin, out_dtype)
        ctx.save_for_backward(xn, rstd, weight, c, s)
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        xn, rstd, weight, c, s = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):  # (torch.mv would run in bf16 under autocast)
            # the rotation's transpose: g_y = [g1*c + g2*s, g2*c - g1*s]
            ns = -s
            gy = _rotate(torch.empty_like(xn), grad.float(), c, ns, c, ns)
            gx, gw = rms_norm_backward(gy, xn, rstd, weight.float(), *ctx.needs_input_grad[:2], g_owned=True)
        return (None if gx is None else gx.to(ctx.x_dtype), None if gw is None else gw.to(weight.dtype),
                None, None, None, None)


def norm_rope(x_BLHK: torch.Tensor, weight_K: torch.Tensor, eps: float, cos_BLk: torch.Tensor, sin_BLk: torch.Tensor,
              out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """apply_rope(rms_norm(x) per head, cos, sin) for x [B, L, H, K] and `rope_tables` [B, L, K/2]; returns
    [B, L, H, K] in `out_dtype` (default: x's and the weight's promoted dtype)."""
    if needs_grad(x_BLHK, weight_K):
        return _NormRope.apply(x_BLHK, weight_K, eps, cos_BLk, sin_BLk, out_dtype)
    return _norm_rope_fwd(x_BLHK, weight_K, eps, cos_BLk, sin_BLk, out_dtype)[0]


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
