"""SailVL forward: image-token scatter, loss, padded and packed batches."""

import pytest
import torch
import torch.nn.functional as F

from .conftest import make_model


def _prompt(model, n_images=1, text=(1, 2, 3)):
    n = model.config.tokens_per_tile
    return [5] + ([6] + [7] * n + [8]) * n_images + list(text)


@torch.no_grad()
def test_image_features_replace_context_rows():
    model = make_model()
    ids = torch.tensor([_prompt(model, 2)])
    pixels = torch.randn(2, 3, 64, 64)
    out = model(ids, pixel_values=pixels)
    feats = model.encode_images(pixels)
    assert feats.shape == (2 * model.config.tokens_per_tile, 64)
    emb = model.language_model.model.embed_tokens(ids)
    emb[ids == 7] = feats
    ref = model.language_model(inputs_embeds=emb).logits
    assert torch.equal(out.logits, ref)
    # the images matter, and text-only input works
    assert not torch.allclose(model(ids, pixel_values=torch.randn(2, 3, 64, 64)).logits, out.logits)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, model.config.llm_config.vocab_size)


def test_image_token_count_mismatch_is_an_error():
    model = make_model()
    with pytest.raises(ValueError, match=r"16 <IMG_CONTEXT> tokens but the images give 32"):
        model(torch.tensor([_prompt(model, 1)]), pixel_values=torch.randn(2, 3, 64, 64))


def test_loss_is_shifted_cross_entropy_with_ignore_index():
    model = make_model()
    ids = torch.randint(10, 100, (2, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    out = model(ids, labels=labels)
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), labels[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, ref) and out.aux_loss is None
    out.loss.backward()
    assert model.vision_model.trunk.blocks[0].attn.qkv.weight.grad is None  # no images, no ViT grads
    assert model.language_model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_moe_loss_adds_aux_loss():
    model = make_model(moe=True)
    ids = torch.randint(10, 100, (2, 12))
    out = model(ids, labels=ids)
    coef = model.config.llm_config.router_aux_loss_coef
    assert torch.allclose(out.loss, out.lm_loss + coef * out.aux_loss)
    load, ent = out.expert_load(8, 2)
    assert load.shape == (2, 8) and ((ent > 0) & (ent <= 1)).all()


@torch.no_grad()
def test_left_padded_batch_equals_unpadded_rows():
    model = make_model()
    a, b = [11, 12, 13, 14, 15, 16], [21, 22, 23]
    ids = torch.tensor([a, [0, 0, 0] + b])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    out = model(ids, attention_mask=mask).logits
    assert (out[0] - model(torch.tensor([a])).logits[0]).abs().max() <= 1e-5
    assert (out[1, 3:] - model(torch.tensor([b])).logits[0]).abs().max() <= 1e-5


def test_packed_row_equals_separate_samples():
    model = make_model()
    samples = [_prompt(model, 1, (1, 2, 3, 4)), [9, 8, 10, 6, 5], _prompt(model, 1, (4, 4))]
    pixels = torch.randn(2, 3, 64, 64)
    ids = torch.tensor([sum(samples, [])])
    cu = torch.tensor([0, len(samples[0]), len(samples[0]) + len(samples[1]), ids.shape[1]])
    with torch.no_grad():
        packed = model(ids, pixel_values=pixels, cu_seqlens=cu).logits[0]
        singles = [model(torch.tensor([samples[0]]), pixel_values=pixels[:1]).logits[0],
                   model(torch.tensor([samples[1]])).logits[0],
                   model(torch.tensor([samples[2]]), pixel_values=pixels[1:]).logits[0]]
    assert (packed - torch.cat(singles)).abs().max() <= 1e-5
    # the loss never predicts across a sample boundary: packed loss == token-weighted mean of singles
    labels = ids.clone()
    loss = model(ids, pixel_values=pixels, labels=labels, cu_seqlens=cu).loss
    total, count = 0.0, 0
    for s, img in zip(samples, [pixels[:1], None, pixels[1:]]):
        t = torch.tensor([s])
        total += model(t, pixel_values=img, labels=t).loss * (len(s) - 1)
        count += len(s) - 1
    assert abs(loss.item() - (total / count).item()) <= 1e-5


def test_packed_rows_as_batch_equal_one_long_row():
    """Rows of a packed step may be a batch [R, L] (attention cost R*L^2) with cu_seqlens over R*L tokens."""
    model = make_model()
    rows = [[11, 12, 13, 14, 15, 16, 0, 0], [21, 22, 23, 31, 32, 33, 34, 35]]
    cu = torch.tensor([0, 6, 8, 11, 16])
    ids = torch.tensor(rows)
    with torch.no_grad():
        as_batch = model(ids, cu_seqlens=cu).logits
        as_one = model(ids.view(1, -1), cu_seqlens=cu).logits.view(2, 8, -1)
    assert (as_batch - as_one).abs().max() <= 1e-5
    labels = ids.clone()
    assert abs(model(ids, labels=labels, cu_seqlens=cu).loss.item()
               - model(ids.view(1, -1), labels=labels.view(1, -1), cu_seqlens=cu).loss.item()) <= 1e-5
    with pytest.raises(ValueError, match="crosses a row boundary"):
        model(ids, cu_seqlens=torch.tensor([0, 6, 11, 16]))


def test_per_sample_attention_path_equals_masked_path(monkeypatch):
    import sailvl.model.attention as A

    model = make_model()
    ids = torch.randint(10, 100, (2, 8))
    cu = torch.tensor([0, 6, 8, 11, 16])
    with torch.no_grad():
        monkeypatch.setattr(A, "PER_SEGMENT_MIN_MEAN_LEN", 10**9)
        masked = model(ids, cu_seqlens=cu).logits
        monkeypatch.setattr(A, "PER_SEGMENT_MIN_MEAN_LEN", 1)
        per_sample = model(ids, cu_seqlens=cu).logits
    assert (masked - per_sample).abs().max() <= 1e-5


def test_labelled_token_losses_equal_full_logits_path():
    """The trainer's loss (LM head on labelled positions only) equals the full-logits cross-entropy."""
    from sailvl.model.vlm import IGNORE_INDEX as IGN

    model = make_model()
    torch.manual_seed(1)
    ids = torch.randint(10, 200, (2, 24))
    labels = ids.clone()
    labels[:, :9] = IGN
    labels[1, 15:18] = IGN
    cu = torch.tensor([0, 10, 24, 40, 48])
    out = model(ids, cu_seqlens=cu)
    ce_full, valid_full = model.token_losses(out.logits, labels, cu)
    hid = model(ids, cu_seqlens=cu, compute_logits=False)
    assert hid.logits is None
    ce, valid = model.labelled_token_losses(hid.hidden, labels, cu)
    assert torch.equal(valid, valid_full)
    assert ce.shape == (int(valid.sum()),)
    torch.testing.assert_close(ce, ce_full[valid], rtol=0, atol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_matmul_attention_path_matches_sdpa(causal):
    """The CPU bf16 training path (explicit matmuls) gives SDPA's outputs and gradients."""
    from sailvl.model import attention as A

    torch.manual_seed(0)
    q = torch.randn(3, 4, 40, 16, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(3, 2, 40, 16, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(3, 2, 40, 16, dtype=torch.bfloat16, requires_grad=True)
    out = A.attention(q, k, v, causal=causal)
    ref = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(2, 1), v.float().repeat_interleave(2, 1),
                                         is_causal=causal)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    g = torch.randn_like(out)
    gq, gk, gv = torch.autograd.grad(out, (q, k, v), g)
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), g.float())
    for a, b in ((gq, rq), (gk, rk), (gv, rv)):
        torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=5e-2)


def test_initializer_range_per_tower():
    """A fresh model draws each tower's weights with its config's initializer_range (HF's field)."""
    from sailvl.config import tiny_config
    from sailvl.model.vlm import SailVL

    cfg = tiny_config()
    cfg.vision_config.initializer_range, cfg.llm_config.initializer_range = 0.1, 0.01
    torch.manual_seed(0)
    model = SailVL(cfg)
    vit_std = torch.cat([m.weight.flatten() for m in model.vision_model.modules() if isinstance(m, torch.nn.Linear)]).std()
    llm_std = torch.cat([m.weight.flatten() for m in model.language_model.modules()
                         if isinstance(m, torch.nn.Linear)]).std()
    assert abs(vit_std - 0.1) < 0.005 and abs(llm_std - 0.01) < 0.0005
    # the default (0.02 for both) draws exactly what init_weights(std=0.02) draws
    a, b = SailVL(tiny_config()), SailVL(tiny_config())
    torch.manual_seed(1)
    a.init_weights()
    torch.manual_seed(1)
    b.init_weights(std=0.02)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
