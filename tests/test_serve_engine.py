"""Engine: greedy == `generate`, concurrent == alone (greedy and seeded), continuous batching (joins and leaves
between steps), capacity queueing, context errors, streaming events, stops, cancellation, detokenization."""

import threading

import pytest
import torch
from PIL import Image

from sailvl.config import tiny_config
from sailvl.data.processor import Processor, ProcessorConfig
from sailvl.data.tokenizer import load_tokenizer, token_id
from sailvl.model.generate import GenerationConfig, generate
from sailvl.model.vlm import SailVL
from sailvl.serve.engine import CapacityError, ContextLengthError, Engine, EngineBusy, Prompt
from sailvl.serve.sampling import SamplingParams, TextStream

CONTEXT = 1024


def make_model_dir(path, bpe_dir, seed: int = 0):
    """A tiny random SAIL-VL2 model directory (64-px tiles of 16 tokens, up to 2 tiles + thumbnail) whose
    greedy and sampled outputs differ from prompt to prompt."""
    tok = load_tokenizer(bpe_dir)
    cfg = tiny_config(vocab_size=tok.get_vocab_size())
    cfg.llm_config.max_position_embeddings = CONTEXT
    cfg.img_context_token_id = token_id(tok, "<IMG_CONTEXT>")
    torch.manual_seed(seed)
    model = SailVL(cfg)
    model.init_weights(std=0.2)  # larger than the default 0.02: outputs then depend on the prompt and images
    model.save_pretrained(path)
    proc = Processor(tok, ProcessorConfig(image_size=64, patch_size=8, max_dynamic_patch=2))
    proc.save_pretrained(path, source_dir=bpe_dir)
    return path


def load(path, **kw) -> Engine:
    return Engine(SailVL.from_pretrained(path).eval(), Processor.from_pretrained(path), **kw)


def picture(w=130, h=60, colour=(200, 30, 30)) -> Image.Image:
    im = Image.new("RGB", (w, h), colour)
    for x in range(0, w, 9):
        im.putpixel((x, x % h), (0, 0, 255))
    return im


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, bpe_dir):
    return make_model_dir(tmp_path_factory.mktemp("model"), bpe_dir)


@pytest.fixture
def engine(model_dir):
    return load(model_dir)


def run_all(engine, handles):
    while not all(h.done() for h in handles):
        engine.step()
    return [h.result() for h in handles]


def ref_generate(engine, prompt: Prompt, **gen):
    m = engine.model
    cfg = GenerationConfig(stop_token_ids=[engine.processor.im_end_id], **gen)
    return generate(m, [prompt.input_ids], cfg, pixel_values=prompt.pixel_values).tokens[0]


PROMPTS = ["What colour is the circle?", "red", "The answer is 42. Think step by step about the blue square."]


def test_greedy_equals_generate_alone_and_concurrently(engine):
    prompts = [engine.prepare([{"role": "user", "content": q}]) for q in PROMPTS]
    prompts.append(engine.prepare([{"role": "user", "content": "<image>\nWhat is it?"}], [picture()]))
    assert prompts[-1].num_image_tokens == 3 * 16  # 2 tiles + thumbnail
    refs = [ref_generate(engine, p, max_new_tokens=24) for p in prompts]
    assert all(len(r) >= 5 for r in refs) and len({tuple(r) for r in refs}) == len(refs)
    alone = [engine.generate(p, SamplingParams(max_new_tokens=24)) for p in prompts]
    together = run_all(engine, [engine.submit(p, SamplingParams(max_new_tokens=24)) for p in prompts])
    for ref, a, t in zip(refs, alone, together):
        assert a.choices[0].token_ids == ref and t.choices[0].token_ids == ref
        assert a.choices[0].text == t.choices[0].text == engine.processor.decode(ref)
    assert engine.stats["max_running"] == len(prompts)


def test_seeded_sampling_is_independent_of_the_batch(engine):
    prompts = [engine.prepare([{"role": "user", "content": q}]) for q in PROMPTS]
    params = [SamplingParams(max_new_tokens=16, temperature=1.0, top_k=40, top_p=0.9, seed=i) for i in range(3)]
    refs = [ref_generate(engine, p, max_new_tokens=16, temperature=1.0, top_k=40, top_p=0.9, seed=i)
            for i, p in enumerate(prompts)]
    assert len({tuple(r) for r in refs}) == len(refs)
    together = run_all(engine, [engine.submit(p, sp) for p, sp in zip(prompts, params)])
    assert [t.choices[0].token_ids for t in together] == refs
    # n choices: choice i samples with seed + i, from one prefill
    two = engine.generate(prompts[0], SamplingParams(max_new_tokens=16, temperature=1.0, seed=5, n=2))
    one = [engine.generate(prompts[0], SamplingParams(max_new_tokens=16, temperature=1.0, seed=s)) for s in (5, 6)]
    assert [c.token_ids for c in two.choices] == [o.choices[0].token_ids for o in one]
    assert two.choices[0].token_ids != two.choices[1].token_ids
    assert two.completion_tokens == sum(o.completion_tokens for o in one)


def test_images_are_encoded_once_per_request(engine, monkeypatch):
    calls = []
    encode = engine.model.encode_images
    monkeypatch.setattr(engine.model, "encode_images", lambda pv: calls.append(1) or encode(pv))
    p = engine.prepare([{"role": "user", "content": "<image>\nWhat is it?"}], [picture()])
    out = engine.generate(p, SamplingParams(max_new_tokens=6, temperature=1.0, seed=0, n=3))
    assert len(out.choices) == 3 and len(calls) == 1 and out.image_tokens == 48


def test_requests_join_and_leave_a_running_batch(engine):
    long_p, short_p = [engine.prepare([{"role": "user", "content": q}]) for q in PROMPTS[:2]]
    long_params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    a = engine.submit(long_p, long_params)
    for _ in range(5):
        engine.step()
    assert engine.num_running == 1 and not a.done()
    b = engine.submit(short_p, SamplingParams(max_new_tokens=4, ignore_eos=True))
    engine.step()
    assert engine.num_running == 2  # b joined between decode steps
    while not b.done():
        engine.step()
    assert not a.done()
    engine.step()
    assert engine.num_running == 1  # b left, a goes on
    a_out = run_all(engine, [a])[0]
    assert a_out.choices[0].token_ids == engine.generate(long_p, long_params).choices[0].token_ids
    assert len(a_out.choices[0].token_ids) == 30
    assert b.result().choices[0].token_ids == engine.generate(short_p, SamplingParams(
        max_new_tokens=4, ignore_eos=True)).choices[0].token_ids


def test_sixteen_requests_decode_together(engine):
    prompts = [engine.prepare([{"role": "user", "content": f"{q} {i}"}]) for i, q in enumerate(PROMPTS * 6)][:16]
    steps0 = engine.stats["decode_steps"]
    outs = run_all(engine, [engine.submit(p, SamplingParams(max_new_tokens=10, ignore_eos=True)) for p in prompts])
    assert all(len(o.choices[0].token_ids) == 10 for o in outs)
    assert engine.stats["decode_steps"] - steps0 == 9  # one batched forward per step, not 16 x 9
    assert engine.stats["max_running"] == 16


def test_capacity_limits_queue_requests(model_dir):
    eng = load(model_dir, max_seqs=2)
    prompts = [eng.prepare([{"role": "user", "content": q}]) for q in PROMPTS]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    handles = [eng.submit(p, params) for p in prompts]
    eng.step()
    assert eng.num_running == 2 and eng.num_waiting == 1
    outs = run_all(eng, handles)
    assert eng.stats["max_running"] == 2
    alone = load(model_dir)
    assert [o.choices[0].token_ids for o in outs] == [alone.generate(p, params).choices[0].token_ids for p in prompts]
    # a cache budget that holds one sequence at a time
    longest = max(len(p.input_ids) for p in prompts) + 8
    tight = load(model_dir, max_cached_tokens=longest + 4)
    outs2 = run_all(tight, [tight.submit(p, params) for p in prompts])
    assert tight.stats["max_running"] == 1
    assert [o.choices[0].token_ids for o in outs2] == [o.choices[0].token_ids for o in outs]
    with pytest.raises(CapacityError, match="max_cached_tokens"):
        tight.submit(prompts[0], SamplingParams(max_new_tokens=8, n=2))
    with pytest.raises(CapacityError, match="max_seqs"):
        eng.submit(prompts[0], SamplingParams(max_new_tokens=8, n=3))
    busy = load(model_dir, max_queue=1)
    busy.submit(prompts[0])
    with pytest.raises(EngineBusy, match="already waiting"):
        busy.submit(prompts[1])


def test_context_overflow_is_a_clear_error(engine):
    with pytest.raises(ContextLengthError, match=f"context is {CONTEXT} tokens"):
        engine.submit(list(range(10, 20)) * (CONTEXT // 10 + 1))
    with pytest.raises(ContextLengthError, match="> the model's context"):
        engine.submit([1, 2, 3], SamplingParams(max_new_tokens=CONTEXT))
    with pytest.raises(ValueError, match="at least one token"):
        engine.submit([])
    # the default budget shrinks to what the context (or the cache budget) leaves
    out = engine.generate(list(range(10, 20)) * 101 + [5, 6], SamplingParams(ignore_eos=True))
    assert len(out.choices[0].token_ids) == CONTEXT - 1012 and out.choices[0].finish_reason == "length"
    small = Engine(engine.model, engine.processor, max_cached_tokens=40)
    assert len(small.generate(list(range(10, 40)), SamplingParams(ignore_eos=True)).choices[0].token_ids) == 11


def test_streaming_events_stops_and_logprobs(engine):
    p = engine.prepare([{"role": "user", "content": PROMPTS[2]}])
    full = engine.generate(p, SamplingParams(max_new_tokens=24, ignore_eos=True))
    text = full.choices[0].text
    assert len(text) > 6
    handle = engine.submit(p, SamplingParams(max_new_tokens=24, ignore_eos=True, logprobs=True, top_logprobs=3))
    events = []
    while not handle.done():
        engine.step()
    events = list(handle)
    out = handle.result()
    assert "".join(e.text for e in events) == text == out.choices[0].text
    assert [e.token_id for e in events if e.token_id is not None] == full.choices[0].token_ids
    assert events[-1].finish_reason == "length" and all(e.finish_reason is None for e in events[:-1])
    lps = out.choices[0].logprobs
    assert len(lps) == 24 and all(lp.top[0][1] >= lp.logprob - 1e-6 and len(lp.top) == 3 for lp in lps)
    assert lps[0].token_id == lps[0].top[0][0]  # greedy picks the most likely token
    # a stop string: the text ends before it, finish "stop"
    stop = text[3:6]
    s = engine.generate(p, SamplingParams(max_new_tokens=24, ignore_eos=True, stop=[stop])).choices[0]
    assert s.finish_reason == "stop" and s.text == text[:text.find(stop)]
    # a stop token id
    tok = full.choices[0].token_ids[4]
    s = engine.generate(p, SamplingParams(max_new_tokens=24, ignore_eos=True, stop_token_ids=[tok])).choices[0]
    assert s.finish_reason == "stop" and s.token_ids == full.choices[0].token_ids[:full.choices[0].token_ids.index(tok)]


def test_cancel_and_background_thread(engine):
    p = engine.prepare([{"role": "user", "content": PROMPTS[0]}])
    h = engine.submit(p, SamplingParams(max_new_tokens=200, ignore_eos=True))
    for _ in range(3):
        engine.step()
    h.cancel()
    engine.step()
    assert h.result().choices[0].finish_reason == "abort" and engine.num_running == 0
    params = [SamplingParams(max_new_tokens=12, temperature=0.8, seed=i) for i in range(6)]
    alone = [engine.generate(p, sp).choices[0].token_ids for sp in params]
    results = [None] * 6
    with engine:
        def worker(i):
            results[i] = [ev.token_id for ev in engine.submit(p, params[i]) if ev.token_id is not None]
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert results == alone


def test_thinking_mode_prompt_and_split(engine):
    p = engine.prepare([{"role": "user", "content": "Solve 2+2."}], thinking=True)
    assert p.thinking and "boxed" in engine.processor.decode(p.input_ids)
    out = engine.generate(p, SamplingParams(max_new_tokens=3))
    assert out.choices[0].answer is not None  # parsed (thinking, answer) are filled in thinking mode
    plain = engine.generate(engine.prepare([{"role": "user", "content": "Solve 2+2."}]), SamplingParams(max_new_tokens=3))
    assert plain.choices[0].answer is None and plain.choices[0].thinking is None


def test_text_stream_holds_back_stop_prefixes_and_split_characters():
    pieces = {1: "Hel", 2: "lo", 3: " EN", 4: "D!", 5: "\xe2", 6: "\x82\xac"}  # 5+6: the bytes of the euro sign

    def decode(ids):
        raw = "".join(pieces[i] for i in ids).encode("latin-1")
        return raw.decode("utf-8", errors="replace")

    s = TextStream(decode, stops=["END"])
    assert [s.add(1), s.add(2), s.add(3)] == ["Hel", "lo", " "]  # " EN" may start "END": held back
    assert s.add(4) == "" and s.stopped and s.text == "Hello "
    s = TextStream(decode, stops=["xyz"])
    assert s.add(5) == "" and s.add(6) == "\u20ac" and s.finish() == ""
    s = TextStream(decode)
    assert s.add(1) == "Hel" and s.add(5) == "" and s.finish() == "\ufffd" and s.text == "Hel\ufffd"
