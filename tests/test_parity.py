"""Our Qwen3 / Qwen3-MoE decoder and AIMv2-style ViT against transformers on the same random weights."""

import pytest
import torch
from transformers import (Aimv2VisionConfig, Aimv2VisionModel, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig,
                          Qwen3MoeForCausalLM)

from sailvl.checkpoint.imports import import_aimv2, import_qwen3
from sailvl.model.llm import Qwen3ForCausalLM as OurQwen3
from sailvl.model.moe import load_balancing_loss
from sailvl.model.vit import VisionTransformer

TOL = 1e-4


def _ours(path):
    cfg, state = import_qwen3(path)
    model = OurQwen3(cfg)
    model.load_state_dict({k.removeprefix("language_model."): v for k, v in state.items()}, strict=True)
    return cfg, model.eval()


@pytest.mark.parametrize("tie", [True, False])
def test_qwen3_logits_match_transformers(tmp_path, tie):
    hf_cfg = Qwen3Config(vocab_size=101, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=tie,
                         rope_theta=1e6, rms_norm_eps=1e-6)
    hf = Qwen3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # random norms so a wrong norm mapping cannot hide behind ones
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path)
    cfg, ours = _ours(tmp_path)
    assert cfg.tie_word_embeddings == tie and cfg.head_dim == 24
    ids = torch.randint(0, 101, (2, 17))
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids).logits).abs().max().item()
    assert diff <= TOL


@pytest.mark.parametrize("norm_topk", [True, False])
def test_qwen3_moe_logits_and_aux_loss_match_transformers(tmp_path, norm_topk):
    hf_cfg = Qwen3MoeConfig(vocab_size=101, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            num_experts=8, num_experts_per_tok=3, norm_topk_prob=norm_topk, mlp_only_layers=[2],
                            decoder_sparse_step=1, output_router_logits=True, router_aux_loss_coef=0.01)
    hf = Qwen3MoeForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "mlp.gate" in n:
                p.normal_(0, 0.5)  # a non-trivial router
    hf.save_pretrained(tmp_path)
    cfg, ours = _ours(tmp_path)
    assert cfg.num_experts == 8 and cfg.mlp_only_layers == [2]
    ids = torch.randint(0, 101, (2, 19))
    with torch.no_grad():
        ref = hf(ids, labels=ids)
        out = ours(ids)
    assert (ref.logits - out.logits).abs().max().item() <= TOL
    assert len(out.router_logits) == 3
    aux = load_balancing_loss(out.router_logits, 8, 3)
    assert abs(aux.item() - ref.aux_loss.item()) <= 1e-6
    # with a padding mask too
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad():
        ref_m = hf(ids, attention_mask=mask, labels=ids)
    hf_logits_m = list(ref_m.router_logits)
    assert abs(load_balancing_loss(hf_logits_m, 8, 3, mask.reshape(-1)).item() - ref_m.aux_loss.item()) <= 1e-6


def test_aimv2_hidden_states_match_every_layer(tmp_path):
    hf_cfg = Aimv2VisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                               image_size=56, patch_size=14, use_head=True)
    hf = Aimv2VisionModel(hf_cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path)
    cfg, state = import_aimv2(tmp_path)
    ours = VisionTransformer(cfg).eval()
    ours.load_state_dict({k.removeprefix("vision_model."): v for k, v in state.items()}, strict=True)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref = hf(x, output_hidden_states=True)
        hidden, last = ours(x, all_hidden=True)
    assert len(hidden) == len(ref.hidden_states) == 4
    for a, b in zip(ref.hidden_states, hidden):
        assert (a - b).abs().max().item() <= TOL
    assert (ref.last_hidden_state - last).abs().max().item() <= TOL
    # select_layer picks the same hidden state without computing later blocks
    with torch.no_grad():
        assert torch.allclose(ours(x, select_layer=-2), hidden[-2], atol=0, rtol=0)
        assert torch.allclose(ours(x, select_layer=1), hidden[1], atol=0, rtol=0)
