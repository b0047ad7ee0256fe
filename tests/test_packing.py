"""Stream packing: packed forward == per-sample forwards, isolation, loss weighting, FFD, stream coverage,
starvation bounds, exact resume, visual row balancing."""

import json
import math
from itertools import islice, pairwise

import numpy as np
import pytest
import torch
from PIL import Image

from sailvl.data.loader import MixtureLoader
from sailvl.data.packing import (
    PackedBatch,
    StreamPacker,
    assign_rows_to_ranks,
    loss_weights_for,
    pack_rows,
    weighted_lm_loss,
)
from sailvl.data.processor import Processor, ProcessorConfig
from sailvl.data.sources import JsonlSource
from sailvl.data.tokenizer import load_tokenizer
from tests.conftest import make_model

WORDS = "What colour is the circle ? red green blue . The answer is 42 . Think step by step".split()


# ------------------------------------------------------------------------------------------------ helpers
def processor(bpe_dir, **kw) -> Processor:
    return Processor(load_tokenizer(bpe_dir), ProcessorConfig(image_size=64, patch_size=8, max_dynamic_patch=1,
                                                              **kw))


def model_for(proc: Processor, **kw):
    model = make_model(vocab_size=512, **kw)
    assert proc.tokenizer.get_vocab_size() <= 512
    model.config.img_context_token_id = proc.img_context_id
    return model


def write_records(tmp_path, n, seed=0, name="mix", image_every=2, sizes=((64, 64),)):
    """n LLaVA records of varying length; every `image_every`-th has an image (random pixels), every 5th two."""
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        q = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 12))))
        a = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 20))))
        rec = {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
        n_img = 0 if i % image_every else (2 if i % 5 == 0 else 1)
        names = []
        for k in range(n_img):
            w, h = sizes[(i + k) % len(sizes)]
            p = tmp_path / "img" / f"{name}{i}_{k}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
            names.append(f"img/{p.name}")
        if n_img == 1:
            rec["image"] = names[0]
            rec["conversations"][0]["value"] = "<image>\n" + q
        elif n_img:
            rec["images"] = names
        recs.append(rec)
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def loader_over(paths, proc, epochs=1, seed=0):
    return MixtureLoader([(JsonlSource(p), w) for p, w in paths], seed=seed, process=proc.encode_sample,
                         epochs=epochs)


def _real_segments(batch: PackedBatch):
    """Segments holding samples: every segment except the padding run at the end of each row."""
    cu = batch.cu_seqlens.tolist()
    out = []
    for s, e in pairwise(cu):
        if batch.labels[0, s:e].eq(-100).all() and batch.input_ids[0, s:e].eq(0).all():
            continue  # padding segment (pad_id 0, no labels)
        out.append((s, e))
    assert len(out) == batch.num_samples == len(batch.refs)
    return out


def image_slices(items):
    """Per item, its slice of a tiles-mode pixel tensor concatenated in item order."""
    out, start = [], 0
    for it in items:
        n = 0 if it["pixel_values"] is None else it["pixel_values"].shape[0]
        out.append(slice(start, start + n))
        start += n
    return out


class ListLoader:
    """A minimal loader: items are given lengths (token ids 1..), refs are (0, index)."""

    def __init__(self, lengths):
        self.lengths, self.pos = list(lengths), 0

    def _item(self, i):
        ids = torch.full((self.lengths[i],), 1 + i % 50, dtype=torch.long)
        return {"input_ids": ids, "labels": ids.clone(), "pixel_values": None, "num_image_tokens": 0, "id": i}

    def with_refs(self):
        while self.pos < len(self.lengths):
            self.pos += 1
            yield (0, self.pos - 1), self._item(self.pos - 1)

    def reread(self, ref):
        return self._item(ref[1])

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]


def row_of(packer_batches, max_len, index):
    """Row number (0-based, over the whole stream) that holds ListLoader item `index`."""
    for b_i, b in enumerate(packer_batches):
        for (s, e), ref in zip(_real_segments(b), b.refs):
            if ref[1] == index:
                return b_i * (b.input_ids.shape[1] // max_len) + s // max_len
    raise AssertionError(f"item {index} never emitted")


# ---------------------------------------------------------------------------------------- model equality
@pytest.fixture
def mix(tmp_path, bpe_dir):
    proc = processor(bpe_dir)
    path = write_records(tmp_path, 12, seed=1)
    return proc, path


def test_packed_forward_and_loss_equal_unpacked(mix):
    proc, path = mix
    model = model_for(proc)
    loader = loader_over([(path, 1)], proc)
    batch = next(iter(StreamPacker(loader, max_len=256, rows_per_step=2, buffer_size=8)))
    items = [loader.reread(r) for r in batch.refs]
    assert sum(it["pixel_values"] is not None for it in items) >= 3 and batch.num_pad > 0
    assert batch.num_image_tokens == sum(it["num_image_tokens"] for it in items) == \
        int((batch.input_ids == proc.img_context_id).sum()) == batch.pixel_values.shape[0] * 16
    assert batch.input_ids.shape == (1, 512) and batch.cu_seqlens.dtype == torch.int32
    with torch.no_grad():
        out = model(batch.input_ids, pixel_values=batch.pixel_values, labels=batch.labels,
                    position_ids=batch.position_ids, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen)
        singles = [model(it["input_ids"][None], pixel_values=it["pixel_values"], labels=it["labels"][None])
                   for it in items]
    for (s, e), it, single in zip(_real_segments(batch), items, singles):
        assert torch.equal(batch.input_ids[0, s:e], it["input_ids"])
        assert (out.logits[0, s:e] - single.logits[0]).abs().max() <= 1e-5
    # loss weighting: token / sample / sqrt averages of the per-sample losses
    n = [int((it["labels"][1:] != -100).sum()) for it in items]
    means = [float(o.loss) for o in singles]
    expected = {"token": sum(m * k for m, k in zip(means, n)) / sum(n),
                "sample": sum(means) / len(means),
                "sqrt": sum(m * math.sqrt(k) for m, k in zip(means, n)) / sum(math.sqrt(k) for k in n)}
    assert abs(float(out.loss) - expected["token"]) <= 1e-5  # the model's own packed loss is the token mean
    for mode, want in expected.items():
        packed_w = torch.zeros_like(batch.loss_weights[0])
        for (s, e), it in zip(_real_segments(batch), items):
            packed_w[s:e] = loss_weights_for(it["labels"], mode)
        loss = weighted_lm_loss(out.logits, batch.labels, packed_w[None], batch.cu_seqlens)
        assert abs(float(loss) - want) <= 1e-5, mode
    # the packer's own weights are the requested mode's
    for mode in ("sample", "sqrt"):
        b2 = next(iter(StreamPacker(loader_over([(path, 1)], proc), max_len=256, rows_per_step=2, buffer_size=8,
                                    loss_weighting=mode)))
        assert torch.equal(b2.input_ids, batch.input_ids)
        loss = weighted_lm_loss(out.logits, b2.labels, b2.loss_weights, b2.cu_seqlens)
        assert abs(float(loss) - expected[mode]) <= 1e-5


def test_perturbing_one_sample_leaves_the_others_unchanged(mix):
    proc, path = mix
    model = model_for(proc)
    loader = loader_over([(path, 1)], proc)
    batch = next(iter(StreamPacker(loader, max_len=512, buffer_size=12)))
    items = [loader.reread(r) for r in batch.refs]
    segs = _real_segments(batch)
    img_idx = [i for i, it in enumerate(items) if it["pixel_values"] is not None]
    a = img_idx[0]
    assert len(img_idx) >= 2 and batch.num_pad > 0
    ids, pix = batch.input_ids.clone(), batch.pixel_values.clone()
    s, e = segs[a]
    text = ids[0, s:e] != proc.img_context_id
    g = torch.Generator().manual_seed(0)
    ids[0, s:e][text] = torch.randint(proc.img_context_id + 1, 256, (int(text.sum()),), generator=g)
    assert int((ids == proc.img_context_id).sum()) == int((batch.input_ids == proc.img_context_id).sum())
    pix[image_slices(items)[a]] = torch.randn_like(pix[image_slices(items)[a]])
    ids[0, -batch.num_pad:] = 99  # and the padding run
    kw = {"position_ids": batch.position_ids, "cu_seqlens": batch.cu_seqlens, "max_seqlen": batch.max_seqlen}
    with torch.no_grad():
        ref = model(batch.input_ids, pixel_values=batch.pixel_values, **kw).logits[0]
        new = model(ids, pixel_values=pix, **kw).logits[0]
    for i, (s, e) in enumerate(segs):
        diff = (ref[s:e] - new[s:e]).abs().max()
        assert diff > 1e-3 if i == a else diff <= 1e-6, (i, a, float(diff))


def test_native_resolution_images_packed_in_sequence_order(tmp_path, bpe_dir):
    proc = Processor(load_tokenizer(bpe_dir), ProcessorConfig(mode="native", patch_size=8, min_pixels=32 * 32,
                                                              max_pixels=64 * 64))
    path = write_records(tmp_path, 8, seed=2, image_every=1, sizes=((64, 32), (32, 48), (48, 48)))
    model = model_for(proc, native=True)
    loader = loader_over([(path, 1)], proc)
    batch = next(iter(StreamPacker(loader, max_len=512, buffer_size=8)))
    items = [loader.reread(r) for r in batch.refs]
    assert isinstance(batch.pixel_values, list)
    expected = [p for it in items for p in it["pixel_values"]]
    assert len(batch.pixel_values) == len(expected) > len(items)
    assert all(torch.equal(x, y) for x, y in zip(batch.pixel_values, expected))
    with torch.no_grad():
        out = model(batch.input_ids, pixel_values=batch.pixel_values, position_ids=batch.position_ids,
                    cu_seqlens=batch.cu_seqlens).logits[0]
        for (s, e), it in zip(_real_segments(batch), items):
            single = model(it["input_ids"][None], pixel_values=it["pixel_values"]).logits[0]
            assert (out[s:e] - single).abs().max() <= 1e-5
    moved = batch.to("cpu", torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in moved.pixel_values)
    assert moved.input_ids.dtype == torch.long and moved.loss_weights.dtype == torch.float32


# -------------------------------------------------------------------------------------------- weights
def test_loss_weights_for():
    labels = torch.tensor([-100, 5, 6, -100, 7, 8])  # 4 trained tokens
    assert loss_weights_for(labels, "token").tolist() == [0, 1, 1, 0, 1, 1]
    assert torch.allclose(loss_weights_for(labels, "sample"), torch.tensor([0, 1, 1, 0, 1, 1]) / 4)
    assert torch.allclose(loss_weights_for(labels, "sqrt"), torch.tensor([0, 1, 1, 0, 1, 1]) / 2)
    # the first token is never predicted inside its sample, so it carries no weight
    assert loss_weights_for(torch.tensor([3, 4, 5]), "sample").tolist() == [0, 0.5, 0.5]
    assert loss_weights_for(torch.tensor([-100, -100]), "sqrt").tolist() == [0, 0]
    with pytest.raises(ValueError, match="loss weighting"):
        loss_weights_for(labels, "mean")


# ------------------------------------------------------------------------------------------ bin packing
def test_pack_rows_ffd():
    assert pack_rows([5, 3, 7, 2, 4, 1], 8) == [[2, 5], [0, 1], [4, 3]]
    rng = np.random.default_rng(0)
    for _ in range(20):
        lengths = rng.integers(1, 50, size=int(rng.integers(1, 60))).tolist()
        rows = pack_rows(lengths, 64)
        assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
        assert len(rows) <= math.ceil(sum(lengths) / 64) * 11 / 9 + 1  # FFD bound
    with pytest.raises(ValueError, match="length 9 > max_len 8"):
        pack_rows([3, 9], 8)


def test_assign_rows_to_ranks():
    assert assign_rows_to_ranks([10, 50, 20, 40, 30, 0], 2) == [[0, 1, 2], [3, 4, 5]]
    vis = [100, 90, 10, 10, 5, 5, 80, 0]
    ranks = assign_rows_to_ranks(vis, 4)  # 2 rows per rank
    assert ranks == [[0, 7], [1, 5], [4, 6], [2, 3]]
    assert [sum(vis[i] for i in r) for r in ranks] == [100, 95, 85, 20]
    assert [len(r) for r in assign_rows_to_ranks([1, 2, 3, 4, 5], 2)] == [3, 2]
    assert assign_rows_to_ranks([], 3) == [[], [], []]


# ----------------------------------------------------------------------------------------------- stream
@pytest.fixture(scope="module")
def synth_mix(tmp_path_factory, bpe_dir):
    from sailvl.data.synth import generate

    d = tmp_path_factory.mktemp("synth")
    generate(d, 240, seed=0)
    generate(d, 60, seed=1, split="extra", tasks=["caption", "math_cot", "video_count"])
    return processor(bpe_dir, video_frames=2), d / "train.jsonl", d / "extra.jsonl"


def test_stream_covers_every_sample_once_with_little_padding(synth_mix):
    proc, train, extra = synth_mix
    loader = loader_over([(train, 3), (extra, 1)], proc)
    expected = sorted(r for r, _ in loader_over([(train, 3), (extra, 1)], proc).with_refs())
    packer = StreamPacker(loader, max_len=1024, rows_per_step=2, buffer_size=64)
    batches = list(packer)
    refs = [tuple(r) for b in batches for r in b.refs]
    assert sorted(refs) == expected and len(refs) == 300
    for b in batches:
        n = b.input_ids.shape[1]
        assert n in (1024, 2048) and b.num_tokens + b.num_pad == n
        assert int(b.cu_seqlens[-1]) == n and b.max_seqlen == max(b.segment_lengths) <= 1024
        assert not set(b.cu_seqlens.tolist()) - set(range(n + 1))
        assert set(range(0, n + 1, 1024)) <= set(b.cu_seqlens.tolist())  # no segment crosses a row boundary
        # positions restart at every segment; padding carries no label and no weight
        for s, e in zip(b.cu_seqlens[:-1].tolist(), b.cu_seqlens[1:].tolist()):
            assert torch.equal(b.position_ids[0, s:e], torch.arange(e - s))
        assert (b.loss_weights[b.labels == -100] == 0).all()
        n_ctx = int((b.input_ids == proc.img_context_id).sum())
        assert n_ctx == b.num_image_tokens == (0 if b.pixel_values is None else 16 * b.pixel_values.shape[0])
    st = packer.stats
    assert st["samples"] == 300 and st["tokens"] == sum(b.num_tokens for b in batches)
    assert st["pad_tokens"] == sum(b.num_pad for b in batches)
    assert st["rows"] == sum(b.input_ids.shape[1] // 1024 for b in batches)
    assert math.isclose(st["padding_fraction"], st["pad_tokens"] / (st["pad_tokens"] + st["tokens"]))
    # padding < 5% on every row but the stream's last few (which only get what is left)
    full = [b for b in batches[:-2]]
    assert sum(b.num_pad for b in full) / sum(b.input_ids.shape[1] for b in full) < 0.05
    assert st["padding_fraction"] < 0.10


def test_sample_longer_than_max_len_is_an_error(synth_mix):
    proc, train, _ = synth_mix
    with pytest.raises(ValueError, match=r"> packing max_len 64"):
        list(StreamPacker(loader_over([(train, 1)], proc), max_len=64))


def test_long_sample_is_not_starved():
    # 300 short samples, then a long one, then more shorts: it leads the first row after it enters the buffer
    lengths = [int(x) for x in np.random.default_rng(0).integers(5, 30, size=600)]
    lengths[300] = 90
    batches = list(StreamPacker(ListLoader(lengths), max_len=100, buffer_size=16))
    # it enters the buffer at the refill before the first row r with (samples in rows < r) + 16 > 300
    consumed = np.cumsum([0] + [b.num_samples for b in batches])
    entered = int(np.argmax(consumed + 16 > 300))
    assert row_of(batches, 100, 300) == entered and batches[entered].refs[0] == (0, 300)  # leads that row
    assert sorted(r[1] for b in batches for r in b.refs) == list(range(600))


def test_oldest_sample_leads_when_overdue():
    # a 60 never fits next to the 70s and 30s that keep arriving; it is taken once it waited max_wait_rows
    lengths = [60] + [70, 30] * 100
    batches = list(StreamPacker(ListLoader(lengths), max_len=100, buffer_size=8, max_wait_rows=5))
    assert row_of(batches, 100, 0) == 5
    assert batches[5].refs[0] == (0, 0)
    never = list(StreamPacker(ListLoader(lengths), max_len=100, buffer_size=8, max_wait_rows=10_000))
    assert row_of(never, 100, 0) >= 90  # without the age rule it waits until the 70s run out


# ----------------------------------------------------------------------------------------------- resume
def assert_same(a: PackedBatch, b: PackedBatch):
    for name in ("input_ids", "labels", "position_ids", "cu_seqlens", "loss_weights"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    assert (a.pixel_values is None) == (b.pixel_values is None)
    if a.pixel_values is not None:
        assert torch.equal(a.pixel_values, b.pixel_values)
    assert (a.max_seqlen, a.num_samples, a.num_pad, a.num_tokens, a.num_image_tokens, a.refs) == \
        (b.max_seqlen, b.num_samples, b.num_pad, b.num_tokens, b.num_image_tokens, b.refs)


@pytest.mark.parametrize("k", [0, 1, 4])
def test_resume_gives_identical_next_batches(synth_mix, k):
    proc, train, extra = synth_mix
    sources = [(train, 3), (extra, 1)]

    def make():
        return StreamPacker(loader_over(sources, proc, epochs=None, seed=5), max_len=768, rows_per_step=2,
                            buffer_size=24, loss_weighting="sqrt", max_wait_rows=4)
    full = list(islice(make(), k + 3))
    first = make()
    it = iter(first)
    for b, want in zip(islice(it, k), full, strict=False):
        assert_same(b, want)
    state = json.loads(json.dumps(first.state_dict()))
    assert len(state["buffer"]) > 0 or k == 0
    fresh = make()
    fresh.load_state_dict(state)
    assert fresh.stats == first.stats
    for got, want in zip(islice(fresh, 3), full[k:]):
        assert_same(got, want)
    with pytest.raises(ValueError, match="max_len"):
        StreamPacker(loader_over(sources, proc), max_len=512, rows_per_step=2, buffer_size=24,
                     loss_weighting="sqrt", max_wait_rows=4).load_state_dict(state)


def test_resume_near_the_end_of_a_finite_stream():
    lengths = [int(x) for x in np.random.default_rng(1).integers(5, 60, size=80)]
    full = list(StreamPacker(ListLoader(lengths), max_len=128, rows_per_step=3, buffer_size=10))
    for k in (len(full) - 2, len(full) - 1, len(full)):
        p = StreamPacker(ListLoader(lengths), max_len=128, rows_per_step=3, buffer_size=10)
        list(islice(p, k))
        q = StreamPacker(ListLoader(lengths), max_len=128, rows_per_step=3, buffer_size=10)
        q.load_state_dict(json.loads(json.dumps(p.state_dict())))
        rest = list(q)
        assert len(rest) == len(full) - k
        for a, b in zip(rest, full[k:]):
            assert_same(a, b)
    assert full[-1].input_ids.shape[1] in (128, 256, 384)


def test_visual_packing_balances_vision_tokens_across_ranks(synth_mix):
    """balance=(rank, 2): the two ranks' rows together are exactly the rows of one packer with twice the rows
    per step, and the vision tokens per step are spread more evenly than a contiguous split would."""
    proc, train, extra = synth_mix
    mk = lambda **kw: StreamPacker(loader_over([(train, 3), (extra, 1)], proc), max_len=512,  # noqa: E731
                                   buffer_size=32, **kw)
    whole = list(mk(rows_per_step=4))
    ranks = [list(mk(rows_per_step=2, balance=(r, 2))) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])
    # a finite stream's last step with fewer rows than ranks is dropped (every rank stops together)
    assert len(whole) == len(ranks[0]) or (len(whole) == len(ranks[0]) + 1 and whole[-1].input_ids.shape[1] == 512)
    gap_balanced = gap_contiguous = 0
    for w, a, b in zip(whole, *ranks):
        assert sorted(map(tuple, a.refs + b.refs)) == sorted(map(tuple, w.refs))
        assert a.num_tokens + b.num_tokens == w.num_tokens
        gap_balanced += abs(a.num_image_tokens - b.num_image_tokens)
        rows = w.input_ids.reshape(-1, 512)
        vis = [int((r == proc.img_context_id).sum()) for r in rows]
        gap_contiguous += abs(sum(vis[: len(vis) // 2]) - sum(vis[len(vis) // 2:]))
    assert gap_balanced < gap_contiguous
    with pytest.raises(ValueError, match="balance"):
        mk(rows_per_step=2, balance=(2, 2))
