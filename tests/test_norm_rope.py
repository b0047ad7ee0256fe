"""The fused RMSNorm and q/k-norm + RoPE Functions against the reference formulas (Qwen3 / AIMv2 RMSNorm:
normalise in fp32, cast back, scale; rotate-half RoPE), forward and backward."""

import pytest
import torch

from sailvl.model.norm import RMSNorm, rms_norm
from sailvl.model.rope import apply_rope, norm_rope, rope_cos_sin, rope_tables

BF16_ULP = 2.0**-7  # the largest relative spacing of bf16 numbers (8 significant bits)
# our rsqrt and the reference's may differ in the last fp32 bit, which can flip the bf16 rounding of a normalised
# value; each flip moves dL/dw by |dL/dy| * one bf16 ulp of that value
GW_TOL_BF16 = 1e-3


def ref_rms_norm(x, w, eps):
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return w * x32.to(x.dtype)


def fwd_bwd(fn, x, w, gy):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    y = fn(x, w)
    y.backward(gy)
    return y.detach(), x.grad, w.grad


def close(a, b, rtol, atol):
    torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol)


def close_scaled(a, b, tol):
    """max |a - b| <= tol * max(1, max |b|): within `tol` relative to the tensor's scale (a sum over many rows
    reorders fp32 additions, so elementwise relative error is meaningless where terms cancel)."""
    err = (a.float() - b.float()).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), (err, b.abs().max().item())


@pytest.mark.parametrize("shape", [(3, 37, 64), (2, 5, 4, 24)])
def test_rms_norm_matches_reference_fp32(shape):
    x, w = torch.randn(shape) * 3, torch.rand(shape[-1]) + 0.5
    gy = torch.randn(shape)
    ref = fwd_bwd(lambda x, w: ref_rms_norm(x, w, 1e-6), x, w, gy)
    ours = fwd_bwd(lambda x, w: rms_norm(x, w, 1e-6), x, w, gy)
    for a, b in zip(ours, ref):
        close_scaled(a, b, 1e-6)


def test_rms_norm_bf16_input():
    """bf16 activations, fp32 weight (autocast): forward within one bf16 ulp (a flipped rounding of the normalised
    value); dL/dx within 2 bf16 ulps of the reference's (which rounds it to bf16 once more on its way through the
    cast); dL/dw within GW_TOL_BF16 of its scale."""
    x, w = (torch.randn(4, 33, 128) * 3).bfloat16(), torch.rand(128) + 0.5
    gy = torch.randn(4, 33, 128)
    (y_r, gx_r, gw_r), (y, gx, gw) = (fwd_bwd(lambda x, w: f(x, w, 1e-5), x, w, gy) for f in (ref_rms_norm, rms_norm))
    assert y.dtype == y_r.dtype == torch.float32 and gx.dtype == torch.bfloat16 and gw.dtype == torch.float32
    close(y, y_r, rtol=BF16_ULP, atol=1e-6)
    close(gx, gx_r, rtol=2 * BF16_ULP, atol=2 * BF16_ULP * gx_r.abs().max().item())
    close_scaled(gw, gw_r, GW_TOL_BF16)


def test_rms_norm_out_dtype_is_the_cast_of_the_fp32_result():
    x, w = torch.randn(2, 9, 32), torch.rand(32) + 0.5
    assert torch.equal(rms_norm(x, w, 1e-6, torch.bfloat16), rms_norm(x, w, 1e-6).to(torch.bfloat16))
    norm = RMSNorm(32, autocast_output=True)
    assert norm(x).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm(x).dtype == torch.bfloat16
        assert RMSNorm(32)(x).dtype == torch.float32
    # gradients through the bf16 output equal those through the fp32 output cast by the consumer
    gy = torch.randn(2, 9, 32).bfloat16()
    a = fwd_bwd(lambda x, w: rms_norm(x, w, 1e-6, torch.bfloat16), x, w, gy)
    b = fwd_bwd(lambda x, w: rms_norm(x, w, 1e-6).to(torch.bfloat16), x, w, gy)
    for u, v in zip(a, b):
        close_scaled(u, v, 1e-6)


def test_rope_tables_are_the_halves_of_rope_cos_sin():
    pos = torch.tensor([[0, 1, 2, 7, 0, 1], [3, 4, 5, 6, 7, 8]])
    cos, sin = rope_cos_sin(pos, 16, 1e4, torch.float32)
    c, s = rope_tables(pos, 16, 1e4)
    assert torch.equal(cos, torch.cat([c, c], -1)) and torch.equal(sin, torch.cat([s, s], -1))


def _norm_rope_case(dtype, H=3, K=16):
    pos = torch.randint(0, 300, (2, 11))
    x, w = (torch.randn(2, 11, H, K) * 3).to(dtype), torch.rand(K) + 0.5
    gy = torch.randn(2, H, 11, K)
    cos, sin = rope_cos_sin(pos, K, 1e4, torch.float32)
    tables = rope_tables(pos, K, 1e4)

    def ref(x, w):  # SelfAttention before: per-head norm, transpose, apply_rope
        return apply_rope(ref_rms_norm(x, w, 1e-6).transpose(1, 2), cos, sin)

    def ours(x, w):
        return norm_rope(x, w, 1e-6, *tables).transpose(1, 2)
    return fwd_bwd(ref, x, w, gy), fwd_bwd(ours, x, w, gy), (x, w, tables)


def test_norm_rope_matches_rotate_half_fp32():
    ref, ours, _ = _norm_rope_case(torch.float32)
    for a, b in zip(ours, ref):
        close_scaled(a, b, 1e-6)


def test_norm_rope_bf16_input():
    """bf16 q/k projections: as test_rms_norm_bf16_input (forward within one bf16 ulp, dL/dx within two, dL/dw
    within GW_TOL_BF16 of its scale)."""
    (y_r, gx_r, gw_r), (y, gx, gw), (x, w, tables) = _norm_rope_case(torch.bfloat16)
    assert y.dtype == torch.float32 and gx.dtype == torch.bfloat16
    close(y, y_r, rtol=BF16_ULP, atol=BF16_ULP * y_r.abs().max().item())
    close(gx, gx_r, rtol=2 * BF16_ULP, atol=2 * BF16_ULP * gx_r.abs().max().item())
    close_scaled(gw, gw_r, GW_TOL_BF16)
    # out_dtype writes the cast of the fp32 result
    assert torch.equal(norm_rope(x, w, 1e-6, *tables, torch.bfloat16), norm_rope(x, w, 1e-6, *tables).bfloat16())


def test_norm_rope_frozen_weight_and_no_grad():
    _, _, (x, w, tables) = _norm_rope_case(torch.float32)
    xg = x.clone().requires_grad_()
    norm_rope(xg, w, 1e-6, *tables).sum().backward()  # weight without grad
    assert xg.grad is not None
    with torch.no_grad():
        assert norm_rope(x, w, 1e-6, *tables).shape == x.shape


def test_inference_path_equals_training_path():
    _, _, (x, w, tables) = _norm_rope_case(torch.bfloat16)
    with torch.no_grad():  # plain function, no autograd.Function
        a, b = norm_rope(x, w, 1e-6, *tables, torch.bfloat16), rms_norm(x, w, 1e-6, torch.bfloat16)
    wg = w.clone().requires_grad_()
    assert torch.equal(a, norm_rope(x, wg, 1e-6, *tables, torch.bfloat16))
    assert torch.equal(b, rms_norm(x, wg, 1e-6, torch.bfloat16))


def test_qwen3_bf16_autocast_training_matches_transformers(tmp_path):
    """fwd+bwd under CPU bf16 autocast (the trainer's setting) against transformers' Qwen3 on the same weights:
    equal up to bf16 rounding (the rounding points differ: fused norm + RoPE, bf16 norm outputs), and as close to
    the fp32 gradients as transformers' are."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from sailvl.checkpoint.imports import import_qwen3
    from sailvl.model.llm import Qwen3ForCausalLM as OurQwen3

    hf = Qwen3ForCausalLM(Qwen3Config(vocab_size=101, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                      tie_word_embeddings=True)).train()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path)
    cfg, state = import_qwen3(tmp_path)
    ours = OurQwen3(cfg).train()
    ours.load_state_dict({k.removeprefix("language_model."): v for k, v in state.items()}, strict=True)
    ids = torch.randint(0, 101, (2, 40))

    def run(model, bf16):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return logits.float().detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    (l_hf, g_hf), (l_ours, g_ours), (_, g_fp32) = run(hf, True), run(ours, True), run(ours, False)
    close_scaled(l_ours, l_hf, 2e-2)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    for name, g in g_ours.items():
        assert rel(g, g_hf[name]) < 3e-2, name
    err_ours = sum(rel(g, g_fp32[n]) for n, g in g_ours.items()) / len(g_ours)
    err_hf = sum(rel(g_hf[n], g_fp32[n]) for n in g_ours) / len(g_ours)
    assert err_ours <= 1.25 * err_hf, (err_ours, err_hf)
