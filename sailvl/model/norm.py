"""RMSNorm as Qwen3 and AIMv2 define it: normalise in fp32, cast back, then scale.

`rms_norm` computes exactly that (y = weight * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype), in the dtype the
product promotes to) as one autograd Function with a hand-written backward: on CPU every elementwise op is a
pass over memory (and an op mixing dtypes costs a hidden cast first), so the reference's ~7 forward and ~15
backward ops (autograd of pow / mean / rsqrt / mul / casts) shrink to ~4 and ~8. `out_dtype` fuses the cast a
consumer would apply anyway (an autocast Linear casts its fp32 input to bf16): the value is the same, and one
cast replaces one per consumer.
"""

from __future__ import annotations

import torch
from torch import nn


def rstd_fp32(x32: torch.Tensor, eps: float) -> torch.Tensor:
    """rsqrt(mean(x^2) + eps) over the last dim, keepdim, for an fp32 tensor (one read pass: vector_norm)."""
    ss = torch.linalg.vector_norm(x32, dim=-1, keepdim=True)
    return ss.square_().div_(x32.shape[-1]).add_(eps).rsqrt_()


def autocast_dtype_for(x: torch.Tensor) -> torch.dtype | None:
    """The dtype an autocast Linear would cast `x` to, or None when autocast is off for x's device."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def rms_norm_backward(g: torch.Tensor, xn: torch.Tensor, rstd: torch.Tensor, w32: torch.Tensor, need_x: bool,
                      need_w: bool, g_owned: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of y = w * xn, xn = x * rstd (rstd = rsqrt(mean(x^2) + eps)), all fp32, given g = dL/dy
    (overwritten when `g_owned`).

    dL/dw = sum over rows of g * xn;  dL/dx = rstd * (g*w - xn * mean(g*w*xn)); the row dot product is the
    matrix-vector product (g*xn) @ w, so g*xn serves both."""
    p = (g * xn).reshape(-1, xn.shape[-1])
    gw = p.sum(0) if need_w else None
    gx = None
    if need_x:
        dot = torch.mv(p, w32).view(rstd.shape).div_(-xn.shape[-1])
        gx = (g.mul_(w32) if g_owned else g * w32).addcmul_(xn, dot).mul_(rstd)
    return gx, gw


def _rms_norm_fwd(x, weight, eps, out_dtype):
    """(y, the normalised value in x's dtype, rstd); no op here is one autocast would recast."""
    x32 = x.float()
    rstd = rstd_fp32(x32, eps)
    xn = (x32 * rstd).to(x.dtype)  # (no-op for fp32 x) the reference rounds to x's dtype, then scales
    y = weight * xn
    if out_dtype is not None and y.dtype != out_dtype:
        y = y.to(out_dtype)
    return y, xn, rstd


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        y, xn, rstd = _rms_norm_fwd(x, weight, eps, out_dtype)
        ctx.save_for_backward(xn, rstd, weight)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, grad):
        xn, rstd, weight = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):  # (torch.mv would run in bf16 under autocast)
            xn = xn.float()  # (the rounded value: dL/dw is exact, dL/dx differs by that rounding at most)
            g = grad.float()
            gx, gw = rms_norm_backward(g, xn, rstd, weight.float(), *ctx.needs_input_grad[:2], g_owned=g is not grad)
        return (None if gx is None else gx.to(ctx.x_dtype), None if gw is None else gw.to(weight.dtype), None, None)


def needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """weight * (x32 * rsqrt(mean(x32^2, -1) + eps)).to(x.dtype), optionally cast to `out_dtype`."""
    if needs_grad(x, weight):
        return _RMSNorm.apply(x, weight, eps, out_dtype)
    return _rms_norm_fwd(x, weight, eps, out_dtype)[0]  # inference: no autograd Function overhead


class RMSNorm(nn.Module):
    """`autocast_output=True`: under autocast, return the autocast dtype (what the Linear layers that consume
    this output would cast it to anyway); use it only where every consumer is such a layer. The forward values
    are the same; in the backward, several consumers' bf16 gradients are summed in bf16 (before: each cast to
    fp32, then summed), a bf16 rounding of that sum."""

    def __init__(self, dim: int, eps: float = 1e-6, autocast_output: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.autocast_output = autocast_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = autocast_dtype_for(x) if self.autocast_output else None
        return rms_norm(x, self.weight, self.eps, out_dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
