"""Qwen3-MoE sparse block: softmax router, top-k (optionally renormalised), SwiGLU experts.

Tokens are grouped by expert with one stable sort, so expert computation is three grouped matmuls
(`torch.nn.functional.grouped_mm`, forward and backward; one matmul per non-empty expert slice on older
torch); there is no loop over tokens. Also here: the auxiliary load-balancing loss with exactly the formula
transformers uses for Qwen3-MoE, the router z-loss, and expert-load statistics.

Letters: T tokens, H hidden, I expert FFN width, E experts, k top-k, A = T*k assignments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LLMConfig


class _PermuteRows(torch.autograd.Function):
    """x[perm] for a permutation; the backward is a gather by the inverse permutation (no scatter-add)."""

    @staticmethod
    def forward(ctx, x, perm, inv):
        ctx.save_for_backward(inv)
        return x[perm]

    @staticmethod
    def backward(ctx, grad):
        (inv,) = ctx.saved_tensors
        return grad[inv], None, None


class _GatherTokens(torch.autograd.Function):
    """Each token copied to its k expert slots, in expert order: x[order // k]. The backward sums the k
    slot gradients of each token via the inverse permutation (a gather and a sum, no scatter-add)."""

    @staticmethod
    def forward(ctx, x_TH, order_A, inv_A, k):
        ctx.save_for_backward(inv_A)
        ctx.k = k
        return x_TH[order_A // k]

    @staticmethod
    def backward(ctx, grad_AH):
        (inv_A,) = ctx.saved_tensors
        return grad_AH[inv_A].view(-1, ctx.k, grad_AH.shape[-1]).sum(1), None, None, None


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: CPU grouped_mm's backward rejects
    the zero-stride gradients that e.g. `y.sum().backward()` produces."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_mm(x_AK: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Rows of x (sorted by expert, offs = cumulative counts) times their expert's [K, N] matrix."""
    if _HAS_GROUPED_MM:
        return _ContiguousGrad.apply(F.grouped_mm(x_AK.to(w_EKN.dtype), w_EKN, offs=offs_E))
    outs, start = [], 0
    for e, end in enumerate(offs_E.tolist()):
        if end > start:
            outs.append(x_AK[start:end] @ w_EKN[e])
        start = end
    return torch.cat(outs) if outs else x_AK.new_zeros(0, w_EKN.shape[-1])


_HAS_GROUPED_MM = hasattr(F, "grouped_mm")


class Experts(nn.Module):
    """E SwiGLU experts stored input-major for grouped matmuls: gate and up fused as `gate_up_proj`
    [E, H, 2I] and `down_proj` [E, I, H]. Checkpoints keep one [out, in] key per expert and projection
    (`experts.{e}.gate_proj.weight`); checkpoint.hf converts."""

    def __init__(self, num_experts: int, hidden: int, inter: int):
        super().__init__()
        self.inter = inter
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, hidden, 2 * inter))
        self.down_proj = nn.Parameter(torch.empty(num_experts, inter, hidden))

    def forward(self, x_AH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_AH is sorted by expert; counts_E[e] rows belong to expert e."""
        offs = counts_E.cumsum(0).to(torch.int32)
        g, u = grouped_mm(x_AH, self.gate_up_proj, offs).chunk(2, dim=-1)
        return grouped_mm(F.silu(g) * u, self.down_proj, offs)

    def forward_naive(self, x_TH: torch.Tensor, e: int) -> torch.Tensor:
        g, u = (x_TH @ self.gate_up_proj[e]).chunk(2, dim=-1)
        return (F.silu(g) * u) @ self.down_proj[e]


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk_prob = cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)

    def route(self, x_TH: torch.Tensor):
        logits_TE = self.gate(x_TH)
        probs_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
        w_Tk, idx_Tk = torch.topk(probs_TE, self.top_k, dim=-1)
        if self.norm_topk_prob:
            w_Tk = w_Tk / w_Tk.sum(dim=-1, keepdim=True)
        return logits_TE, w_Tk.to(x_TH.dtype), idx_Tk

    def forward(self, x_BLH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (output [B, L, H], router logits [T, E])."""
        shape = x_BLH.shape
        T, H, k = shape[:-1].numel(), shape[-1], self.top_k
        x_TH = x_BLH.reshape(T, H)
        logits_TE, w_Tk, idx_Tk = self.route(x_TH)
        flat_A = idx_Tk.reshape(-1)
        order_A = torch.argsort(flat_A, stable=True)  # assignment slots grouped by expert
        inv_A = torch.empty_like(order_A)
        inv_A[order_A] = torch.arange(order_A.numel(), device=order_A.device)
        counts_E = torch.bincount(flat_A, minlength=self.num_experts)
        # every token goes to its k expert slots (sorted by expert), runs, and comes back; both moves are
        # gathers in forward and backward, and each token's k results combine with one bmm.
        x_AH = _GatherTokens.apply(x_TH, order_A, inv_A, k)
        y_TkH = _PermuteRows.apply(self.experts(x_AH, counts_E), inv_A, order_A).view(T, k, H)
        out_TH = torch.bmm(w_Tk[:, None, :], y_TkH.to(w_Tk.dtype))[:, 0]
        return out_TH.to(x_BLH.dtype).reshape(shape), logits_TE

    def forward_naive(self, x_BLH: torch.Tensor) -> torch.Tensor:
        """Reference: a plain loop over experts with boolean masks (used by tests)."""
        x_TH = x_BLH.reshape(-1, x_BLH.shape[-1])
        _, w_Tk, idx_Tk = self.route(x_TH)
        out = torch.zeros_like(x_TH)
        for e in range(self.num_experts):
            tok, slot = torch.where(idx_Tk == e)
            if len(tok):
                out[tok] += self.experts.forward_naive(x_TH[tok], e) * w_Tk[tok, slot, None]
        return out.reshape(x_BLH.shape)


def load_balancing_loss(router_logits: list[torch.Tensor], num_experts: int, top_k: int,
                        token_mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-style auxiliary loss, pooled over layers, as transformers' Qwen3-MoE computes it:
    E * sum_e (fraction of top-k assignments to e) * (mean router probability of e), where both
    averages run over all layers' tokens together (and only unmasked tokens when a mask is given)."""
    counts_E = 0.0
    prob_sum_E = 0.0
    rows = 0.0
    for logits_TE in router_logits:
        probs = torch.softmax(logits_TE.float(), dim=-1)
        _, idx = torch.topk(probs, top_k, dim=-1)
        one_hot_TE = F.one_hot(idx, num_experts).sum(1).float()
        if token_mask_T is not None:
            m = token_mask_T.reshape(-1, 1).float()
            one_hot_TE, probs, n = one_hot_TE * m, probs * m, m.sum()
        else:
            n = probs.shape[0]
        counts_E = counts_E + one_hot_TE.sum(0)
        prob_sum_E = prob_sum_E + probs.sum(0)
        rows = rows + n
    return (counts_E / rows * (prob_sum_E / rows)).sum() * num_experts


def router_z_loss(router_logits: list[torch.Tensor]) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(router logits)^2, averaged over layers."""
    return torch.stack([torch.logsumexp(r.float(), -1).pow(2).mean() for r in router_logits]).mean()


@torch.no_grad()
def expert_load(router_logits: list[torch.Tensor], num_experts: int, top_k: int,
                token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer: fraction of top-k assignments per expert [layers, E] and its normalised entropy [layers]
    (1.0 = perfectly balanced). `token_mask` (any shape with T elements, True = counted) drops padding."""
    loads = []
    for logits_TE in router_logits:
        if token_mask is not None:
            logits_TE = logits_TE[token_mask.reshape(-1).bool()]
        idx = torch.topk(logits_TE.float(), top_k, dim=-1).indices.reshape(-1)
        loads.append(torch.bincount(idx, minlength=num_experts).float() / max(idx.numel(), 1))
    load_LE = torch.stack(loads)
    ent = -(load_LE * load_LE.clamp_min(1e-12).log()).sum(-1) / torch.log(torch.tensor(float(num_experts)))
    return load_LE, ent
