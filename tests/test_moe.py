"""The grouped MoE computation against a naive per-expert loop, and the router losses / statistics."""

import pytest
import torch

from sailvl.config import LLMConfig
from sailvl.model.moe import SparseMoeBlock, expert_load, load_balancing_loss, router_z_loss

from .conftest import make_model


def _block(norm=True):
    cfg = LLMConfig(hidden_size=32, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=24,
                    num_attention_heads=4, num_key_value_heads=2, norm_topk_prob=norm)
    block = SparseMoeBlock(cfg)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return block


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("grad", [True, False])
def test_grouped_equals_naive_loop(norm, grad):
    block = _block(norm)
    x = torch.randn(3, 11, 32)
    with torch.set_grad_enabled(grad):
        out, logits = block(x)
        ref = block.forward_naive(x)
    assert (out - ref).abs().max() <= 1e-5
    assert logits.shape == (33, 8)


def test_grouped_gradients_equal_naive():
    block = _block()
    x = torch.randn(2, 9, 32, requires_grad=True)
    block(x)[0].square().sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in block.parameters()]
    x.grad = None
    block.zero_grad()
    block.forward_naive(x).square().sum().backward()
    for a, b in zip(grads, [x.grad] + [p.grad for p in block.parameters()]):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()  # fp32 summation order differs


def test_aux_loss_is_one_when_uniform_and_z_loss_and_load():
    # identical logits for all experts: every expert's probability 1/E, aux loss = E * sum(f_e / E) = top_k
    logits = [torch.zeros(10, 4)]
    assert abs(load_balancing_loss(logits, 4, 2).item() - 2.0) < 1e-6
    z = router_z_loss([torch.zeros(5, 4)])
    assert abs(z.item() - torch.log(torch.tensor(4.0)).item() ** 2) < 1e-5
    skewed = torch.tensor([[5.0, 4.0, 0.0, 0.0]]).repeat(6, 1)
    load, ent = expert_load([skewed, torch.randn(6, 4)], 4, 2)
    assert load.shape == (2, 4) and load[0].tolist() == [0.5, 0.5, 0.0, 0.0]
    assert abs(ent[0].item() - 0.5) < 1e-6 and torch.allclose(load.sum(-1), torch.ones(2))


def test_packed_padding_is_not_counted_in_router_statistics():
    """A packed row [sample, padding]: with the packer's token_mask, the aux loss and the expert load are
    those of the sample alone."""
    model = make_model(moe=True)
    torch.manual_seed(3)
    ids = torch.randint(10, 200, (1, 10))
    alone = model(ids)
    padded = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], 1)
    mask = torch.tensor([[True] * 10 + [False] * 6])
    packed = model(padded, cu_seqlens=torch.tensor([0, 10, 16]), token_mask=mask)
    cfg = model.config.llm_config
    torch.testing.assert_close(packed.aux_loss, alone.aux_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed.expert_load(cfg.num_experts, cfg.num_experts_per_tok)[0],
                               alone.expert_load(cfg.num_experts, cfg.num_experts_per_tok)[0])
    unmasked = model(padded, cu_seqlens=torch.tensor([0, 10, 16]))
    assert not torch.allclose(unmasked.aux_loss, alone.aux_loss)
