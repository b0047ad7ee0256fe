"""KV-cache decoding == full forward; batched generation == one prompt at a time; sampling controls."""

import pytest
import torch

from sailvl.model.generate import GenerationConfig, filter_logits, generate

from .conftest import make_model


def _full_forward_greedy(model, prompt, n, pixel_values=None):
    ids, logits = list(prompt), []
    for _ in range(n):
        out = model(torch.tensor([ids]), pixel_values=pixel_values).logits[0, -1]
        logits.append(out)
        ids.append(int(out.argmax()))
    return ids[len(prompt):], torch.stack(logits)


@pytest.mark.parametrize("kw", [{}, {"moe": True}])
@torch.no_grad()
def test_kv_cache_decoding_equals_full_forward(kw):
    model = make_model(**kw)
    prompt = [3, 9, 27, 81, 5, 11]
    ref_tokens, ref_logits = _full_forward_greedy(model, prompt, 12)
    out = generate(model, [prompt], GenerationConfig(max_new_tokens=12), return_logits=True)
    assert out.tokens[0] == ref_tokens
    assert (torch.stack(out.logits)[:, 0] - ref_logits).abs().max() <= 1e-5


@torch.no_grad()
def test_kv_cache_with_image_equals_full_forward():
    model = make_model()
    n_img = model.config.tokens_per_tile
    prompt = [1, 2] + [7] * n_img + [3, 4]
    pixels = torch.randn(1, 3, 64, 64)
    ref_tokens, ref_logits = _full_forward_greedy(model, prompt, 8, pixels)
    out = generate(model, [prompt], GenerationConfig(max_new_tokens=8), pixel_values=pixels, return_logits=True)
    assert out.tokens[0] == ref_tokens
    assert (torch.stack(out.logits)[:, 0] - ref_logits).abs().max() <= 1e-5


@pytest.mark.parametrize("gen", [GenerationConfig(max_new_tokens=10),
                                 GenerationConfig(max_new_tokens=10, temperature=0.9, top_k=20, top_p=0.9, seed=3)])
@torch.no_grad()
def test_batched_generation_equals_one_by_one(gen):
    model = make_model(moe=True)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16], [20], [30, 31, 32, 33, 34]]
    batched = generate(model, prompts, gen, return_logits=True)
    for i, p in enumerate(prompts):
        alone = generate(model, [p], gen, return_logits=True)
        assert batched.tokens[i] == alone.tokens[0]
        steps = len(alone.logits)
        assert (torch.stack(batched.logits[:steps])[:, i] - torch.stack(alone.logits)[:, 0]).abs().max() <= 1e-5


@torch.no_grad()
def test_seed_reproducible_and_stops():
    model = make_model()
    gen = GenerationConfig(max_new_tokens=20, temperature=1.5, seed=7)
    a, b = generate(model, [[1, 2, 3]], gen), generate(model, [[1, 2, 3]], gen)
    assert a.tokens == b.tokens and a.finish_reasons == ["length"] and len(a.tokens[0]) == 20
    first = a.tokens[0][4]
    stopped = generate(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=20, temperature=1.5, seed=7,
                                                            stop_token_ids=[first]))
    cut = a.tokens[0].index(first)
    assert stopped.tokens[0] == a.tokens[0][:cut] and stopped.finish_reasons == ["stop"]
    decode = lambda ids: " ".join(map(str, ids))  # noqa: E731
    stop_str = f" {a.tokens[0][6]} "
    s = generate(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=20, temperature=1.5, seed=7,
                                                      stop_strings=[stop_str]), decode=decode)
    assert s.finish_reasons == ["stop"] and stop_str not in s.texts[0]
    assert decode(a.tokens[0]).startswith(s.texts[0])


def test_filter_logits_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.81)).tolist() == [[False, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.1)).tolist() == [[False, True, True, True]]


def test_bad_generation_requests():
    model = make_model()
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]])
    with pytest.raises(ValueError, match="exceeds the context"):
        generate(model, [[1] * 4000], GenerationConfig(max_new_tokens=200))
