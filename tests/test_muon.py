"""Muon (sailvl.train.muon): the Newton-Schulz iteration flattens the spectrum, Muon groups step like
torch.optim.Muon and AdamW groups exactly like torch's fused AdamW, the state round-trips exactly, and stages
choose it by name (hidden matrices on Muon, embeddings / norms / biases on AdamW)."""

import copy

import pytest
import torch
from torch import nn

from sailvl.config import tiny_config
from sailvl.model.vlm import SailVL
from sailvl.train.muon import MuonAdamW, muon_lr_scale, orthogonalize, use_muon
from sailvl.train.optim import build_optimizer
from sailvl.train.stages import DataSpec, Stage


def with_spectrum(shape, sigmas, seed=0):
    """Random matrices (batch, m, n) with the given singular values."""
    g = torch.Generator().manual_seed(seed)
    b, m, n = shape
    u = torch.linalg.qr(torch.randn(b, m, m, generator=g))[0][..., : len(sigmas)]
    v = torch.linalg.qr(torch.randn(b, n, n, generator=g))[0][..., : len(sigmas)]
    return u @ torch.diag(sigmas) @ v.mT


def test_orthogonalize_maps_every_singular_value_near_one():
    sigmas = torch.logspace(1, -1.5, 24)  # a condition number of ~300
    for shape in ((3, 24, 40), (3, 40, 24)):  # wide and tall (iterated on the transpose)
        g = with_spectrum(shape, sigmas)
        s = torch.linalg.svdvals(orthogonalize(g).float())
        # Keller Jordan's coefficients trade exactness for speed: every value lands in about [0.7, 1.2]
        assert s.min() > 0.6 and s.max() < 1.25, s
        assert torch.linalg.svdvals(g).min() < 0.05  # ... from a spectrum that spanned 0.03 .. 10
    g = with_spectrum((4, 24, 40), sigmas)
    batched = orthogonalize(g)
    for i in range(4):  # a batch is the matrices one at a time (up to bf16 rounding)
        torch.testing.assert_close(batched[i].float(), orthogonalize(g[i]).float(), rtol=0, atol=2e-2)
    assert orthogonalize(g).dtype == torch.bfloat16


def pair(shapes, seed=0):
    torch.manual_seed(seed)
    a = [nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
    return a, [nn.Parameter(p.detach().clone()) for p in a]


def step_both(opts, params, shapes, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        grads = [torch.randn(s, generator=g) for s in shapes]
        for ps, opt in zip(params, opts):
            for p, grad in zip(ps, grads):
                p.grad = grad.clone()
            opt.step()


def test_muon_groups_step_like_torch_muon():
    shapes = [(32, 48), (48, 32), (32, 48), (16, 16)]  # two of one shape: iterated as one batch here
    a, b = pair(shapes)
    ours = MuonAdamW([{"params": a, "muon": True}], lr=0.02, weight_decay=0.1)
    ref = torch.optim.Muon(b, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    start = [p.detach().clone() for p in a]
    step_both([ours, ref], [a, b], shapes, 4)
    for p, q, p0 in zip(a, b, start):
        moved = (q - p0).abs().max()
        assert moved > 0.01  # the parameters did move ...
        torch.testing.assert_close(p, q, rtol=0, atol=2e-3 * float(moved.detach()))  # ... and the same way (bf16 products)
    assert muon_lr_scale((256, 768)) == pytest.approx(0.2 * 768 ** 0.5)


def test_adamw_groups_are_torch_fused_adamw_exactly():
    shapes = [(32, 48), (48,), (7, 5)]
    a, b = pair(shapes)
    groups = lambda ps: [{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "weight_decay": 0.0, "lr": 3e-3}]  # noqa: E731
    ours = MuonAdamW(groups(a), lr=1e-3, betas=(0.9, 0.95))
    ref = torch.optim.AdamW(groups(b), lr=1e-3, betas=(0.9, 0.95), fused=True)
    step_both([ours, ref], [a, b], shapes, 5)
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    assert set(ours.state[a[0]]) == set(ref.state[b[0]]) == {"step", "exp_avg", "exp_avg_sq"}


def test_state_dict_round_trip_continues_exactly():
    shapes = [(32, 48), (48,), (16, 16)]
    a, _ = pair(shapes)
    make = lambda ps: MuonAdamW([{"params": [ps[0], ps[2]], "muon": True}, {"params": [ps[1]]}], lr=0.01)  # noqa: E731
    opt = make(a)
    step_both([opt], [a], shapes, 3)
    saved, b = copy.deepcopy(opt.state_dict()), [nn.Parameter(p.detach().clone()) for p in a]
    again = make(b)
    again.load_state_dict(saved)
    step_both([opt, again], [a, b], shapes, 2, seed=7)
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    assert set(saved["state"][0]) == {"momentum_buffer"}


def test_stage_optimizer_muon_puts_hidden_matrices_on_muon():
    model = SailVL(tiny_config(vocab_size=300))
    stage = Stage("s", 1, [DataSpec("x.jsonl")], lr={"vit": 1e-4, "adapter": 1e-3, "llm": 1e-3}, optimizer="muon")
    opt = build_optimizer(model, stage)
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    on_muon = {names[id(p)] for g in opt.param_groups if g["muon"] for p in g["params"]}
    on_adamw = {names[id(p)] for g in opt.param_groups if not g["muon"] for p in g["params"]}
    assert on_muon and on_adamw and not on_muon & on_adamw
    assert all(model.get_parameter(n).dim() == 2 for n in on_muon)
    assert "language_model.model.embed_tokens.weight" in on_adamw  # the tied embedding / LM head
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in on_muon
    assert any("norm" in n for n in on_adamw) and not any("norm" in n for n in on_muon)
    assert {g["base_lr"] for g in opt.param_groups if g["muon"]} == {1e-4, 1e-3}  # per-module lrs kept
    assert all(use_muon(n, model.get_parameter(n)) for n in on_muon)
    assert not isinstance(build_optimizer(model, Stage("s", 1, [DataSpec("x.jsonl")], lr={"vit": 1e-4, "adapter": 1e-3,
                                                                                          "llm": 1e-3})), MuonAdamW)
    with pytest.raises(ValueError, match="optimizer must be adamw or muon"):
        Stage("s", 1, [DataSpec("x.jsonl")], optimizer="sgd")
    with pytest.raises(ValueError, match="2-D matrices only"):
        MuonAdamW([{"params": [nn.Parameter(torch.zeros(3))], "muon": True}])
