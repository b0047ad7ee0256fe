"""SAIL-ViT pretraining on dense synthetic labels: the label maps, the stream, and the vision stage."""

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from sailvl.config import tiny_config
from sailvl.data.synth import render as R
from sailvl.data.synth.dense import (BIND_HEADS, CHARS, HEADS, IGNORE, IMAGE_TEXT, MIN_PIXELS, READ_KINDS, TEXT_SLOTS, DenseStream,
                                     Element, _Canvas, _write, transcript_label)
from sailvl.data.synth.scene import Obj, draw_obj
from sailvl.data.synth.world import BACKGROUND, World
from sailvl.data.tokenizer import train_bpe
from sailvl.model.vlm import SailVL
from sailvl.train.stages import RunConfig, Stage
from sailvl.train.trainer import Trainer
from sailvl.train.vision import dense_loss, stream_for


def ink_per_patch(img: Image.Image, patch: int) -> np.ndarray:
    ink = (np.asarray(img) != np.array(BACKGROUND, dtype=np.uint8)).any(-1)
    g = ink.shape[0] // patch
    return ink.reshape(g, patch, g, patch).sum((1, 3))


def test_object_labels_cover_exactly_the_patches_it_paints():
    img = Image.new("RGB", (64, 64), BACKGROUND)
    c = _Canvas(img)
    o = Obj("triangle", "blue", "large", 30, 25, 15)
    c.paint(lambda d: draw_obj(d, o), Element("blue", "triangle", "large"))
    lab = c.labels(8)
    painted = ink_per_patch(img, 8) >= MIN_PIXELS
    assert painted.sum() > 4
    assert np.array_equal(lab["colour"] > 0, painted)
    assert set(np.unique(lab["colour"][painted])) == {HEADS["colour"].index("blue")}
    assert set(np.unique(lab["shape"][painted])) == {HEADS["shape"].index("triangle")}
    assert set(np.unique(lab["size"][painted])) == {HEADS["size"].index("large")}
    assert not lab["char"].any()


def test_overlapping_elements_each_patch_goes_to_who_paints_most_of_it():
    """A pixel belongs to the element drawn on it last (a background-coloured paint clears it); a patch is labelled
    with the element owning most of its pixels (a tie: the first drawn) when that is >= MIN_PIXELS. Checked against
    a plain count over the pixel owners, found from the images before and after each paint. Fills that differ from
    what they cover in one channel only, and an element of exactly MIN_PIXELS pixels alone in its patch, included."""
    rng = random.Random(4)
    img = Image.new("RGB", (64, 64), BACKGROUND)
    c = _Canvas(img)
    owner, elements = np.full((64, 64), -1), []
    fills = [(10, 10, 10), (10, 10, 200), (10, 200, 10), (200, 10, 10)]
    # (box, fill, colour label or None for a clearing paint): MIN_PIXELS pixels alone in patch (0, 0) ...
    paints = [((1, 1, 1, 1 + MIN_PIXELS - 1), fills[0], "red")]
    # ... two elements of 4 pixels each in patch (0, 1), a tie the first drawn wins ...
    paints += [((9, 1, 10, 2), fills[2], "green"), ((12, 1, 13, 2), fills[3], "blue")]
    for k in range(14):  # ... overlapping rectangles, some cleared again ...
        x0, y0 = rng.randrange(8, 56), rng.randrange(8, 56)
        box = (x0, y0, x0 + rng.randrange(1, 20), y0 + rng.randrange(1, 20))
        paints.append((box, BACKGROUND, None) if k % 5 == 4 else
                      (box, fills[k % len(fills)], rng.choice(["red", "blue", "green"])))
    # ... and a patch painted twice, the second time changing the blue channel only
    paints += [((24, 40, 31, 47), fills[0], "red"), ((24, 40, 31, 47), fills[1], "blue")]
    for box, fill, colour in paints:
        el = None if colour is None else Element(colour, "square", "small")
        before = np.asarray(img).copy()
        c.paint(lambda d, box=box, fill=fill: d.rectangle(box, fill=fill), el)
        changed = (np.asarray(img) != before).any(-1)
        owner[changed] = -1 if el is None else len(elements)
        if el is not None:
            elements.append(el)
    lab = c.labels(8)
    for i in range(8):
        for j in range(8):
            counts = [int((owner[8 * i:8 * i + 8, 8 * j:8 * j + 8] == e).sum()) for e in range(len(elements))]
            best = int(np.argmax(counts))
            want = HEADS["colour"].index(elements[best].colour) if counts[best] >= MIN_PIXELS else 0
            assert lab["colour"][i, j] == want, (i, j, counts)
    assert lab["colour"][0, 0] == HEADS["colour"].index("red") and lab["colour"][5, 3] == HEADS["colour"].index("blue")
    assert lab["colour"][0, 1] == HEADS["colour"].index("green")


def test_characters_are_labelled_left_to_right_in_their_own_patches():
    img = Image.new("RGB", (64, 64), BACKGROUND)
    c = _Canvas(img)
    _write(c, "7Q", (6, 20), 26, "black")
    lab = c.labels(8)["char"]
    cols = {ch: np.nonzero(lab == HEADS["char"].index(ch))[1] for ch in "7Q"}
    assert len(cols["7"]) and len(cols["Q"])
    assert cols["7"].mean() < cols["Q"].mean()
    assert np.array_equal(lab > 0, (ink_per_patch(img, 8) >= MIN_PIXELS) & (lab > 0))  # labels sit on ink


def test_stream_is_a_pure_function_of_seed_and_step():
    s = DenseStream(World(), seed=3)
    x1, y1 = s.batch(5, 8)
    x2, y2 = DenseStream(World(), seed=3).batch(5, 8)
    x3, _ = s.batch(6, 8)
    assert x1.shape == (8, 3, 64, 64) and all(y1[k].shape == (8, 8, 8) for k in HEADS)
    assert y1[IMAGE_TEXT].shape == (8, TEXT_SLOTS)
    assert torch.equal(x1, x2) and all(torch.equal(y1[k], y2[k]) for k in HEADS)
    assert not torch.equal(x1, x3)
    for k, vocab in HEADS.items():
        assert int(y1[k].min()) >= 0 and int(y1[k].max()) < len(vocab)


def test_every_kind_labels_what_it_draws():
    rng = random.Random(0)
    for kind, head in [("scene", "shape"), ("text", "char"), ("table", "char"), ("chart", "char"),
                       ("glyph", "char")]:
        img, lab = DenseStream(World(), kinds={kind: 1}).sample(rng)
        assert (lab[head] > 0).any(), kind
        # of the dense kinds only a one-character image has a transcript: the character its patches show, then "end"
        want = [int(lab["char"].max())] + [0] * (TEXT_SLOTS - 1) if kind == "glyph" else [IGNORE] * TEXT_SLOTS
        assert lab[IMAGE_TEXT].tolist() == want, kind
        # every labelled patch has ink (table lines / chart axes are drawn but never labelled)
        assert ((lab["colour"] > 0) <= (ink_per_patch(img, 8) >= MIN_PIXELS)).all(), kind
    with pytest.raises(ValueError, match="unknown dense image kinds"):
        DenseStream(World(), kinds={"photos": 1})
    assert len(CHARS) == len(HEADS["char"]) - 1


def test_binding_labels_join_each_chart_item_and_table_cell_to_its_keys():
    """Chart: the label, the bar and the value text of an item all carry the item's label letter, value and rank;
    table: every cell carries its column's and its row's header letters. Nothing else gets a binding label."""
    rng = random.Random(0)
    for _ in range(5):
        img, lab = DenseStream(World(), kinds={"chart": 1}).sample(rng)
        key, value, rank, char = lab["key"], lab["value"], lab["rank"], lab["char"]
        assert ((key > 0) == (lab["colour"] > 0)).all()  # every painted patch (label, bar, value) and only those
        items = {}
        for k in np.unique(key[key > 0]):
            m = key == k
            vals, ranks = set(np.unique(value[m])), set(np.unique(rank[m]))
            assert len(vals) == 1 and len(ranks) == 1  # one item: one value, one rank
            items[BIND_HEADS["key"][k]] = (int(BIND_HEADS["value"][vals.pop()]), BIND_HEADS["rank"][ranks.pop()])
            # the label letter itself is among the item's patches (the bottom row), and so is the value's digit
            assert HEADS["char"].index(BIND_HEADS["key"][k]) in set(np.unique(char[m]))
            assert HEADS["char"].index(str(items[BIND_HEADS["key"][k]][0])) in set(np.unique(char[m]))
        assert len(items) == World().chart_items
        by_value = sorted(items.values())
        assert by_value[0][1] == "lowest" and by_value[-1][1] == "highest"
        assert all(r == "other" for _, r in by_value[1:-1])
        assert not lab["row_key"].any()
    img, lab = DenseStream(World(), kinds={"table": 1}).sample(random.Random(0))
    char, key, row_key = lab["char"], lab["key"], lab["row_key"]
    col_head, row_head, cell = (key > 0) & (row_key == 0), (key == 0) & (row_key > 0), (key > 0) & (row_key > 0)
    assert ((char > 0) == (col_head | row_head | cell)).all()
    # a header is keyed by itself; a cell by the headers of its column (same x) and of its row (same y)
    assert (key[col_head] == char[col_head]).all() and (row_key[row_head] == char[row_head]).all()
    ys, xs = np.indices(char.shape)
    for k in np.unique(key[cell]):
        assert abs(xs[cell & (key == k)].mean() - xs[col_head & (key == k)].mean()) <= 1
    for k in np.unique(row_key[cell]):
        assert abs(ys[cell & (row_key == k)].mean() - ys[row_head & (row_key == k)].mean()) <= 1
    assert len(np.unique(key[cell])) == World().table_shape[1] and len(np.unique(row_key[cell])) == World().table_shape[0]
    for kind in ("scene", "text", "glyph"):
        _, lab = DenseStream(World(), kinds={kind: 1}).sample(random.Random(1))
        assert not any(lab[h].any() for h in BIND_HEADS), kind
    _, lab = DenseStream(World(), kinds={"read_chart": 1}).sample(random.Random(1))
    assert all((lab[h] == IGNORE).all() for h in BIND_HEADS)


def decode(label) -> str:
    return "".join(HEADS["char"][i] for i in label if i > 0)


def test_read_kinds_are_the_world_s_own_images_with_their_transcripts():
    w = World(ocr_max_chars=2, table_max_value=9)
    draw = {"read_ocr": R.make_text_image, "read_equation": R.make_equation_image, "read_chart": R.make_chart,
            "read_table": R.make_table}
    for kind in READ_KINDS:
        for seed in range(5):
            # the stream draws the kind, then the image with the same generator: replay it
            rng = random.Random(seed)
            img, lab = DenseStream(w, kinds={kind: 1}).sample(rng)
            rng = random.Random(seed)
            rng.choices([kind], [1])
            spec, ref = draw[kind](rng, w)
            assert np.array_equal(np.asarray(img), np.asarray(ref)), kind
            text = {"read_ocr": spec.get("text"), "read_equation": spec.get("text"),
                    "read_chart": "".join(f"{a}{b}" for a, b in zip(spec.get("labels", []), spec.get("values", []))),
                    "read_table": "".join(spec.get("cols", [])) + "".join(
                        r + "".join(map(str, row)) for r, row in zip(spec.get("rows", []), spec.get("cells", [])))}[kind]
            assert decode(lab[IMAGE_TEXT]) == text[:TEXT_SLOTS], kind
            assert all((lab[h] == IGNORE).all() for h in HEADS), kind  # no per-patch labels
    assert transcript_label("AB").tolist() == [HEADS["char"].index("A"), HEADS["char"].index("B")] + [0] * 6
    assert decode(transcript_label("ABCDEFGHIJ")) == "ABCDEFGH"
    with pytest.raises(ValueError, match="outside the char head's vocabulary"):
        transcript_label("ab")


def test_dense_loss_ignores_unlabelled_entries_and_never_divides_by_zero():
    torch.manual_seed(0)
    _, labels = DenseStream(World(), kinds={"read_table": 1, "scene": 1}).batch(0, 6)
    logits = {**{k: torch.randn(6, 8, 8, len(v)) for k, v in HEADS.items()},
              IMAGE_TEXT: torch.randn(6, TEXT_SLOTS, len(HEADS["char"]))}
    loss, _ = dense_loss(logits, labels)
    # the reference: per head, the mean cross-entropy over exactly the labelled entries
    ref = sum(torch.nn.functional.cross_entropy(logits[k].reshape(-1, logits[k].shape[-1])[labels[k].reshape(-1) != IGNORE],
                                                labels[k].reshape(-1)[labels[k].reshape(-1) != IGNORE])
              for k in logits)
    torch.testing.assert_close(loss, ref)
    only_read = DenseStream(World(), kinds={"read_ocr": 1}).batch(0, 4)[1]
    loss, acc = dense_loss({k: v[:4] for k, v in logits.items()}, only_read)
    assert torch.isfinite(loss) and np.isnan(acc["char"]) and 0 <= acc[IMAGE_TEXT] <= 1


def test_dense_loss_is_zero_for_perfect_logits():
    labels = {k: torch.randint(0, len(v), (2, 8, 8)) for k, v in HEADS.items()}
    logits = {k: torch.nn.functional.one_hot(v, len(HEADS[k])).float() * 100 for k, v in labels.items()}
    loss, acc = dense_loss(logits, labels)
    assert float(loss) < 1e-6 and all(a == 1.0 for a in acc.values())


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_bpe(["a small red circle", "What is written in the image?"] * 20, 300, d)
    return d


def vision_run(tok, out, steps=6, **kw) -> RunConfig:
    cfg = tiny_config(vocab_size=300)
    st = Stage("dense", steps, [], kind="vision", trainable=["vit"], lr={"vit": 2e-3}, rows_per_step=8,
               warmup_steps=1, vision={"world": {"image_size": cfg.vision_config.image_size}})
    return RunConfig(name="v", model=cfg, tokenizer=str(tok), out_dir=str(out), stages=[st], precision="fp32",
                     checkpoint_every=3, log_every=1, **kw)


def test_vision_stage_trains_only_the_vit_and_learns(tok, tmp_path):
    run = vision_run(tok, tmp_path, steps=25)
    final = Trainer(run, quiet=True).fit()
    torch.manual_seed(run.seed)
    init = SailVL(run.model)
    after = SailVL.from_pretrained(final)
    for name, p in after.state_dict().items():
        assert torch.equal(p, init.state_dict()[name]) != name.startswith("vision_model."), name
    recs = [json.loads(x) for x in (tmp_path / "v" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 26))
    assert np.mean([r["loss"] for r in recs[-5:]]) < 0.7 * np.mean([r["loss"] for r in recs[:3]])
    assert (tmp_path / "v" / "00_dense" / "vision_heads.safetensors").exists()


def test_position_heads_make_the_tower_keep_where_each_patch_is(tok, tmp_path):
    """The dense stage also asks every patch for its row and column (labels 1..grid), so position survives to the
    last layer's features; metrics log their accuracies, which training lifts well above chance (1/8 here; the
    demo's tower reaches ~1.0)."""
    from sailvl.train.vision import DenseHeads, position_labels
    lab = position_labels(2, 4)
    assert lab["row"][1].tolist() == [[1] * 4, [2] * 4, [3] * 4, [4] * 4]
    assert lab["col"][0].tolist() == [[1, 2, 3, 4]] * 4
    out = DenseHeads(16, grid=4)(torch.zeros(3, 16, 16))
    assert out["row"].shape == out["col"].shape == (3, 16, 5)
    assert "row" not in DenseHeads(16)(torch.zeros(3, 16, 16))  # no grid, no position heads
    run = vision_run(tok, tmp_path, steps=25)
    run.stages[0].vision["position"] = 1.0
    Trainer(run, quiet=True).fit()
    recs = [json.loads(x) for x in (tmp_path / "v" / "metrics.jsonl").read_text().splitlines()]
    for head in ("acc_row", "acc_col"):
        first, last = np.mean([r[head] for r in recs[:3]]), np.mean([r[head] for r in recs[-3:]])
        assert last > 0.3 and last > 1.5 * first, (head, first, last)


def test_binding_heads_train_under_the_bind_option(tok, tmp_path):
    from sailvl.train.vision import DenseHeads
    out = DenseHeads(16, bind=True)(torch.zeros(3, 16, 16))
    assert all(out[h].shape == (3, 16, len(v)) for h, v in BIND_HEADS.items())
    assert "key" not in DenseHeads(16)(torch.zeros(3, 16, 16))
    first = {}
    for w in (0.0, 1.0, 2.0):  # the same model, heads and first batch: the binding heads add w x their loss
        run = vision_run(tok, tmp_path / f"w{w}", steps=2)
        run.stages[0].vision.update(bind=w, kinds={"chart": 1, "table": 1})
        Trainer(run, quiet=True).fit()
        first[w] = json.loads((tmp_path / f"w{w}" / "v" / "metrics.jsonl").read_text().splitlines()[0])
    assert "acc_key" not in first[0.0] and all(f"acc_{h}" in first[1.0] for h in BIND_HEADS)
    extra = first[1.0]["loss"] - first[0.0]["loss"]
    assert extra > 1.0  # four fresh classifiers' cross-entropy
    assert first[2.0]["loss"] - first[0.0]["loss"] == pytest.approx(2 * extra, rel=1e-3)
    bad = vision_run(tok, tmp_path / "neg", steps=1)
    bad.stages[0].vision["bind"] = -1.0
    with pytest.raises(ValueError, match="bind must be >= 0"):
        Trainer(bad, quiet=True).fit()


def test_vision_stage_resumes_exactly(tok, tmp_path, monkeypatch):
    Trainer(vision_run(tok, tmp_path / "full"), quiet=True).fit()
    full = [json.loads(x)["loss"] for x in (tmp_path / "full" / "v" / "metrics.jsonl").read_text().splitlines()]

    real = DenseStream.batch

    def crash_at_4(self, step, n, offset=0):
        if step == 4:
            raise KeyboardInterrupt("simulated crash")
        return real(self, step, n, offset)

    monkeypatch.setattr(DenseStream, "batch", crash_at_4)
    with pytest.raises(KeyboardInterrupt):
        Trainer(vision_run(tok, tmp_path / "cut"), quiet=True).fit()
    monkeypatch.setattr(DenseStream, "batch", real)
    Trainer(vision_run(tok, tmp_path / "cut"), resume=True, quiet=True).fit()
    cut = [json.loads(x)["loss"] for x in (tmp_path / "cut" / "v" / "metrics.jsonl").read_text().splitlines()]
    assert cut == full  # steps 1-3 before the crash, 4-6 after resuming from the step-3 checkpoint


def test_vision_stage_rejects_training_other_towers(tok, tmp_path):
    run = vision_run(tok, tmp_path)
    run.stages[0].trainable = ["vit", "llm"]
    with pytest.raises(ValueError, match="can only train"):
        Trainer(run, quiet=True).fit()


def test_llm_embed_target_aligns_adapter_tokens_to_word_embeddings(tok, tmp_path):
    run = vision_run(tok, tmp_path, steps=25)
    st = run.stages[0]
    st.trainable, st.lr = ["vit", "adapter"], {"vit": 2e-3, "adapter": 2e-3}
    st.vision = {**st.vision, "target": "llm_embed"}
    final = Trainer(run, quiet=True).fit()
    torch.manual_seed(run.seed)
    init = SailVL(run.model)
    after = SailVL.from_pretrained(final)
    for name, p in after.state_dict().items():  # the LLM (and its embeddings, the class vectors) stays as it was
        assert torch.equal(p, init.state_dict()[name]) == name.startswith("language_model."), name
    recs = [json.loads(x) for x in (tmp_path / "v" / "metrics.jsonl").read_text().splitlines()]
    assert np.mean([r["loss"] for r in recs[-5:]]) < 0.7 * np.mean([r["loss"] for r in recs[:3]])
    # labels live on the LLM-token grid: 64 px / (patch 8 / pixel-shuffle 0.5) = 4 x 4
    stream = stream_for(st, after, 0)
    assert stream.grid == 4
