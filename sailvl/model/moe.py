"""Qwen3-MoE sparse block: softmax router, top-k (optionally renormalised), SwiGLU experts.

Tokens are grouped by expert with one stable sort, so expert computation is a handful of large matmuls
(`torch._grouped_mm` where it applies, else one matmul per non-empty expert over a contiguous slice);
there is no loop over tokens. Also here: the auxiliary load-balancing loss with exactly the formula
transformers uses for Qwen3-MoE, the router z-loss, and expert-load statistics.

Letters: T tokens, H hidden, I expert FFN width, E experts, k top-k, A = T*k assignments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LLMConfig


class Experts(nn.Module):
    """E SwiGLU experts stored as stacked weights (checkpoints keep one key per expert; see checkpoint.hf)."""

    def __init__(self, num_experts: int, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_experts, inter, hidden))
        self.up_proj = nn.Parameter(torch.empty(num_experts, inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter))

    def forward(self, x_AH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_AH is sorted by expert; counts_E[e] rows belong to expert e."""
        use_grouped = hasattr(torch, "_grouped_mm") and (x_AH.is_cuda or not torch.is_grad_enabled())
        if use_grouped:
            offs = counts_E.cumsum(0).to(torch.int32)
            g = torch._grouped_mm(x_AH, self.gate_proj.transpose(1, 2), offs=offs)
            u = torch._grouped_mm(x_AH, self.up_proj.transpose(1, 2), offs=offs)
            return torch._grouped_mm(F.silu(g) * u, self.down_proj.transpose(1, 2), offs=offs)
        outs = []
        for e, x in enumerate(torch.split(x_AH, counts_E.tolist())):
            if x.shape[0]:
                h = F.silu(x @ self.gate_proj[e].T) * (x @ self.up_proj[e].T)
                outs.append(h @ self.down_proj[e].T)
        return torch.cat(outs) if outs else x_AH.new_zeros(x_AH.shape)

    def forward_naive(self, x_TH: torch.Tensor, e: int) -> torch.Tensor:
        return (F.silu(x_TH @ self.gate_proj[e].T) * (x_TH @ self.up_proj[e].T)) @ self.down_proj[e].T


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
        x_TH = x_BLH.reshape(-1, shape[-1])
        logits_TE, w_Tk, idx_Tk = self.route(x_TH)
        flat_A = idx_Tk.reshape(-1)
        order_A = torch.argsort(flat_A, stable=True)
        token_A = order_A // self.top_k
        counts_E = torch.bincount(flat_A, minlength=self.num_experts)
        y_AH = self.experts(x_TH[token_A], counts_E) * w_Tk.reshape(-1)[order_A, None]
        out_TH = torch.zeros_like(x_TH).index_add_(0, token_A, y_AH.to(x_TH.dtype))
        return out_TH.reshape(shape), logits_TE

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
    return torch.stack([torch.logsumexp(l.float(), -1).pow(2).mean() for l in router_logits]).mean()


@torch.no_grad()
def expert_load(router_logits: list[torch.Tensor], num_experts: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer: fraction of top-k assignments per expert [layers, E] and its normalised entropy [layers]
    (1.0 = perfectly balanced)."""
    loads = []
    for logits_TE in router_logits:
        idx = torch.topk(logits_TE.float(), top_k, dim=-1).indices.reshape(-1)
        loads.append(torch.bincount(idx, minlength=num_experts).float() / max(idx.numel(), 1))
    load_LE = torch.stack(loads)
    ent = -(load_LE * load_LE.clamp_min(1e-12).log()).sum(-1) / torch.log(torch.tensor(float(num_experts)))
    return load_LE, ent
