"""Attention supervision: ask one LLM attention head to look at what the answer is about.

A tiny LLM trained from scratch learns slowly to find, among an image's tokens, the object a question names: the
routing (which key matches the question) gets no direct signal from a one-word answer. Samples whose records name
`focus` boxes (sailvl.data.focus) carry marks: the image tokens covering those boxes, and the position that
predicts the first answer token. For a stage with `focus={"weight": w, "layers": [...], "head": h}` the trainer adds

    w * mean over marked queries and listed layers of  -log(sum of head h's attention probabilities on the targets)

computed from that head's own queries and keys (after q/k-norm and RoPE, the attention the model really runs: the
softmax over the sample's tokens up to the query, scale 1/sqrt(head_dim)). The head stays free to split its
attention among the targets; the other heads are untouched. Inference does not change.
"""

from __future__ import annotations

import torch

from ..data.focus import FOCUS_QUERY, FOCUS_TARGET
from ..model.attention import segment_ids


def focus_nll(q_BHLK: torch.Tensor, k_BGLK: torch.Tensor, focus_BL: torch.Tensor, cu_seqlens: torch.Tensor,
              head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(-log attention mass on the targets per marked query [Q], that mass [Q]) for query head `head`.
    q: [B, H, L, K], k: [B, G, L, K] (GQA: head h reads kv group h // (H / G)); focus: [B, L] marks;
    cu_seqlens: packed sample bounds over the B * L row-major tokens."""
    B, H, L, K = q_BHLK.shape
    G = k_BGLK.shape[1]
    if not 0 <= head < H:
        raise ValueError(f"focus head {head} does not exist (the layer has {H} query heads)")
    n = B * L
    marks = focus_BL.reshape(n)
    queries = (marks == FOCUS_QUERY).nonzero().flatten()
    if not len(queries):
        empty = q_BHLK.new_zeros(0, dtype=torch.float32)
        return empty, empty
    q = q_BHLK[:, head].reshape(n, K)[queries].float()  # [Q, K]
    k = k_BGLK[:, head // (H // G)].reshape(n, K).float()  # [N, K]
    logits = (q @ k.T) * K**-0.5  # [Q, N]
    seg = segment_ids(cu_seqlens, n)
    pos = torch.arange(n, device=marks.device)
    visible = (seg[None, :] == seg[queries][:, None]) & (pos[None, :] <= queries[:, None])
    logp = torch.log_softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    on_target = visible & (marks == FOCUS_TARGET)[None, :]
    log_mass = torch.logsumexp(logp.masked_fill(~on_target, float("-inf")), dim=-1)
    return -log_mass, log_mass.detach().exp()


def set_capture(model, layers: list[int], on: bool) -> None:
    """Make the listed decoder layers keep their (q, k) for `focus_nll` (or stop keeping them)."""
    decoder = model.language_model.model.layers
    for i in layers:
        if not -len(decoder) <= i < len(decoder):
            raise ValueError(f"focus layer {i} does not exist (the LLM has {len(decoder)} layers)")
        decoder[i].self_attn.keep_qk = on
        if not on:
            decoder[i].self_attn.qk = None


def focus_loss(model, focus_BL: torch.Tensor, cu_seqlens: torch.Tensor, layers: list[int], head: int):
    """(mean -log mass over marked queries and listed layers, mean mass) from the (q, k) the layers kept in the
    last forward; None when the batch has no marked query."""
    decoder = model.language_model.model.layers
    nll, mass = [], []
    for i in layers:
        qk = decoder[i].self_attn.qk
        if qk is None:
            raise RuntimeError(f"decoder layer {i} kept no (q, k): call set_capture before the forward")
        a, b = focus_nll(*qk, focus_BL, cu_seqlens, head)
        nll.append(a)
        mass.append(b)
    nll, mass = torch.cat(nll), torch.cat(mass)
    if not len(nll):
        return None
    return nll.mean(), mass.mean()
