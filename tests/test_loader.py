"""MixtureLoader: skips counted and reported, weighted mixture, exact resume, sharding, epochs, termination."""

import json
from collections import Counter
from itertools import islice

import pytest

from sailvl.data.loader import MixtureLoader, reason_kind
from sailvl.data.schema import SkipSample
from sailvl.data.sources import JsonlSource, WebDatasetSource
from tests.test_sources import conv, js, write_jsonl, write_png, write_tar


def keys(items):
    return [(s.source, s.key) for s in items]


def take(loader, n):
    return list(islice(loader, n))


def good_source(tmp_path, name, n, bad=()):
    """n text records; the indices in `bad` have no assistant turn."""
    lines = [{"conversations": [{"from": "human", "value": f"{name} {i}"}]} if i in bad else conv(f"{name} {i}")
             for i in range(n)]
    return JsonlSource(write_jsonl(tmp_path / f"{name}.jsonl", lines))


def too_long(sample):
    n = sum(len(m["content"]) for m in sample.messages)
    if n > 40:
        raise SkipSample(f"too long: {n} characters")
    return sample


def test_bad_records_skipped_counted_and_reported(tmp_path):
    write_png(tmp_path / "a.png")
    lines = [conv("<image>\nshort", image="a.png"), conv("fine"), conv("x" * 60), conv("also fine"),
             '{"conversations": [',                                      # malformed JSON
             conv("<image>\n?", image="gone.png"),                       # missing image
             {"conversations": [{"from": "human", "value": "hi"}]},     # no assistant turn
             conv("<image>\n<image>\n?", image="a.png"),                 # placeholder mismatch
             {"messages": [{"role": "user", "content": [{"type": "image_url",
                                                          "image_url": {"url": "data:image/png;base64,%%%"}}]},
                           {"role": "assistant", "content": "?"}]},      # bad base64
             conv("y" * 80)]
    mixed = JsonlSource(write_jsonl(tmp_path / "mixed.jsonl", lines))
    tar = WebDatasetSource(write_tar(tmp_path / "w.tar", {f"{i:03d}": {"json": js(conv(f"t{i}"))}
                                                          for i in range(3)}))
    loader = MixtureLoader([(mixed, 1.0), (tar, 1.0)], seed=3, epochs=1, process=too_long, report_dir=tmp_path / "r")
    out = list(loader)
    expected = [("mixed", f"line {i}") for i in (1, 2, 4)] + [("w", f"w.tar:{i:03d}") for i in range(3)]
    assert sorted(keys(out)) == sorted(expected)
    st = loader.stats
    assert (st["read"], st["used"], st["skipped"]) == (13, 6, 7) and st["read"] == st["used"] + st["skipped"]
    assert st["skipped_by_reason"] == {"malformed JSON": 1, "missing image": 1, "no assistant turn": 1,
                                       "N <image> placeholders but N images": 1, "bad data URI": 1, "too long": 2}
    assert st["sources"]["w"] == {"read": 3, "used": 3, "skipped": 0, "skipped_by_reason": {}, "epoch": 1,
                                  "status": "finished"}
    report = [json.loads(x) for x in (tmp_path / "r" / "skipped.jsonl").read_text().splitlines()]
    assert len(report) == 7 and all(r["source"] == "mixed" and r["epoch"] == 0 for r in report)
    by_key = {r["key"]: r["reason"] for r in report}
    assert by_key["line 3"] == "too long: 62 characters" and by_key["line 10"].startswith("too long")
    assert by_key["line 5"].startswith("malformed JSON") and by_key["line 6"].startswith("missing image: ")
    assert by_key["line 7"] == "no assistant turn" and by_key["line 9"].startswith("bad data URI")
    assert by_key["line 8"] == "2 <image> placeholders but 1 images"


def test_reason_kind():
    assert reason_kind("missing image: /x/1.png") == "missing image"
    assert reason_kind("12 <image> placeholders but 3 images") == "N <image> placeholders but N images"


def test_mixture_follows_weights_and_is_deterministic(tmp_path):
    a, b = good_source(tmp_path, "a", 10), good_source(tmp_path, "b", 7)
    sources = [(a, 1.0), (b, 3.0)]
    out = keys(take(MixtureLoader(sources, seed=1), 4000))
    frac_b = sum(s == "b" for s, _ in out) / len(out)
    assert 0.72 < frac_b < 0.78
    assert keys(take(MixtureLoader(sources, seed=1), 300)) == out[:300]
    assert keys(take(MixtureLoader(sources, seed=2), 300)) != out[:300]
    only_a = keys(take(MixtureLoader([(a, 1.0), (b, 0.0)], seed=1), 50))
    assert {s for s, _ in only_a} == {"a"}


@pytest.mark.parametrize("epochs", [None, 2])
def test_resume_equals_uninterrupted(tmp_path, epochs):
    a = good_source(tmp_path, "a", 8, bad={3})
    b = JsonlSource(write_jsonl(tmp_path / "b.jsonl", [conv("b short"), conv("b " + "z" * 50), conv("b ok"),
                                                       "{oops", conv("b last")]))
    def make():
        return MixtureLoader([(a, 2.0), (b, 1.0)], seed=5, process=too_long, epochs=epochs)
    full = keys(make()) if epochs else keys(take(make(), 60))
    assert len(full) == (2 * (7 + 3) if epochs else 60)
    for k in (0, 1, 5, 9, 13, len(full) // 2, len(full) - 1, len(full)):
        first = make()
        head = keys(take(first, k))
        state = json.loads(json.dumps(first.state_dict()))
        second = make()
        second.load_state_dict(state)
        tail = keys(second) if epochs else keys(take(second, len(full) - k))
        assert head + tail == full, k
        uninterrupted = make()
        list(uninterrupted) if epochs else take(uninterrupted, len(full))
        assert second.stats == uninterrupted.stats


def test_state_dict_is_a_snapshot(tmp_path):
    loader = MixtureLoader([(good_source(tmp_path, "a", 5), 1.0)], seed=0)
    take(loader, 2)
    state = loader.state_dict()
    frozen = json.dumps(state)
    take(loader, 7)
    assert json.dumps(state) == frozen


def test_sharding_covers_an_epoch_exactly_once(tmp_path):
    a, b = good_source(tmp_path, "a", 11, bad={4}), good_source(tmp_path, "b", 6)
    seen, reported = [], []
    for rank in range(2):
        for worker in range(2):
            loader = MixtureLoader([(a, 1.0), (b, 2.0)], seed=9, rank=rank, world_size=2, worker_id=worker,
                                   num_workers=2, epochs=1, report_dir=tmp_path / "rep")
            seen += keys(loader)
            reported += [(rank, worker)] * loader.stats["skipped"]
    expected = [("a", f"line {i + 1}") for i in range(11) if i != 4] + [("b", f"line {i + 1}") for i in range(6)]
    assert sorted(seen) == sorted(expected) and len(seen) == len(set(seen))
    r, w = reported[0]
    assert len(reported) == 1 and (tmp_path / "rep" / f"skipped.rank{r}.worker{w}.jsonl").exists()
    loader = MixtureLoader([(a, 1.0)], rank=1, world_size=2, report_dir=tmp_path / "rep2")
    assert loader.report_path.name == "skipped.rank1.jsonl"


def test_epochs_and_reshuffling(tmp_path):
    a = good_source(tmp_path, "a", 9)
    out = keys(MixtureLoader([(a, 1.0)], seed=4, epochs=3))
    assert Counter(out) == Counter({k: 3 for k in set(out)}) and len(set(out)) == 9
    assert out[:9] != out[9:18] and sorted(out[:9]) == sorted(out[9:18])


def test_unusable_sources_do_not_loop_forever(tmp_path):
    good = good_source(tmp_path, "good", 3)
    bad = good_source(tmp_path, "bad", 4, bad={0, 1, 2, 3})
    empty = JsonlSource(write_jsonl(tmp_path / "empty.jsonl", [""]))
    loader = MixtureLoader([(good, 1.0), (bad, 5.0), (empty, 1.0)], seed=0)
    with pytest.warns(RuntimeWarning) as caught:
        out = keys(take(loader, 30))
    assert sorted(str(w.message).split(":")[0] for w in caught) == ["source 'bad'", "source 'empty'"]
    assert "no usable record" in str(caught[0].message) + str(caught[1].message)
    assert {s for s, _ in out} == {"good"}
    assert loader.stats["sources"]["bad"]["status"] == "unusable" and loader.stats["sources"]["bad"]["read"] == 4
    assert loader.stats["sources"]["empty"]["read"] == 0
    with pytest.warns(RuntimeWarning):
        assert list(MixtureLoader([(bad, 1.0)])) == []
    def reject(sample):
        raise SkipSample("too long: 9999 tokens")

    always_skip = MixtureLoader([(good, 1.0)], process=reject)
    with pytest.warns(RuntimeWarning):
        assert list(always_skip) == [] and always_skip.stats["skipped"] == 3


def test_process_result_is_yielded(tmp_path):
    loader = MixtureLoader([(good_source(tmp_path, "a", 3), 1.0)], process=lambda s: s.key.upper(), epochs=1)
    assert sorted(loader) == ["LINE 1", "LINE 2", "LINE 3"]


def test_bad_arguments_and_mismatched_state(tmp_path):
    a, b = good_source(tmp_path, "a", 3), good_source(tmp_path, "b", 3)
    for kwargs, msg in [({"rank": 2, "world_size": 2}, "rank"), ({"worker_id": 1}, "worker_id"),
                        ({"seed": -1}, "seed"), ({"epochs": 0}, "epochs")]:
        with pytest.raises(ValueError, match=msg):
            MixtureLoader([(a, 1.0)], **kwargs)
    for sources, msg in [([], "at least one"), ([(a, 1.0), (a, 1.0)], "unique"), ([(a, 0.0)], "not all 0"),
                         ([(a, -1.0)], ">= 0"), ([(a, "x")], "numbers"), ([("a.jsonl", 1.0)], "not a Source")]:
        with pytest.raises(ValueError, match=msg):
            MixtureLoader(sources)
    state = MixtureLoader([(a, 1.0), (b, 1.0)], seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        MixtureLoader([(a, 1.0), (b, 1.0)], seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="sources"):
        MixtureLoader([(b, 1.0), (a, 1.0)], seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="not a MixtureLoader state"):
        MixtureLoader([(a, 1.0)]).load_state_dict({"rng": 1})
    MixtureLoader([(a, 1.0), (b, 4.0)], seed=1).load_state_dict(state)  # new weights are allowed


def test_source_that_turns_unusable_in_a_later_epoch_stops(tmp_path):
    calls = []

    def process(sample):  # fine during the first epoch, then everything is "too long"
        calls.append(sample.key)
        if len(calls) > 40:
            raise RuntimeError("the loader kept reading a source with nothing usable")
        if len(calls) > 4:
            raise SkipSample("too long: 999")
        return sample

    loader = MixtureLoader([(good_source(tmp_path, "a", 4), 1.0)], process=process)
    with pytest.warns(RuntimeWarning, match="no usable record in epoch 1"):
        assert len(list(loader)) == 4
    assert loader.stats["read"] == 8 and loader.stats["sources"]["a"]["status"] == "unusable"


def test_processor_skips_flow_through_the_loader(tmp_path, bpe_dir):
    """Decoding-stage problems (corrupt image, decompression bomb, too many tokens) are skips too."""
    from sailvl.data.processor import Processor, ProcessorConfig
    from sailvl.data.tokenizer import load_tokenizer

    write_png(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    from PIL import Image
    Image.new("RGB", (300, 300)).save(tmp_path / "big.png")
    lines = [conv("<image>\nok?", image="ok.png"), conv("<image>\nbad?", image="corrupt.png"),
             conv("<image>\nbig?", image="big.png"), conv("red " * 100), conv("fine")]
    src = JsonlSource(write_jsonl(tmp_path / "p.jsonl", lines))
    proc = Processor(load_tokenizer(bpe_dir), ProcessorConfig(image_size=64, patch_size=8, max_dynamic_patch=1,
                                                              max_image_pixels=200 * 200, max_length=120))
    loader = MixtureLoader([(src, 1.0)], epochs=1, process=proc.encode_sample, report_dir=tmp_path / "r")
    out = list(loader)
    assert len(out) == 2 and all("input_ids" in o for o in out)
    st = loader.stats
    assert st["read"] == 5 and st["used"] + st["skipped"] == 5
    assert st["skipped_by_reason"] == {"corrupt image": 1, "decompression bomb": 1, "too long": 1}
    report = [json.loads(line) for line in (tmp_path / "r" / "skipped.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in report) == ["line 2", "line 3", "line 4"]
