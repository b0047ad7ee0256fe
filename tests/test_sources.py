"""Sources: JSONL / WebDataset tar / parquet readers on good and bad records, open_source."""

import base64
import io
import json
import pickle
import tarfile
import warnings
from pathlib import Path

import pytest
from PIL import Image

from sailvl.data.schema import SkipSample
from sailvl.data.sources import JsonlSource, ParquetSource, Source, WebDatasetSource, open_source, open_sources


def png_bytes(color=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path: Path, color=(255, 0, 0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(color))
    return path


def write_jsonl(path: Path, lines) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def conv(user, reply="ok", **extra):
    return {"conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": reply}], **extra}


def skip_reason(src: Source, i: int) -> str:
    with pytest.raises(SkipSample) as e:
        src.read(i)
    return e.value.reason


# ------------------------------------------------------------------------------------------------ JSONL
def test_jsonl_llava_forms(tmp_path):
    for n in ("a", "b", "f0", "f1"):
        write_png(tmp_path / "img" / f"{n}.png")
    (tmp_path / "v.mp4").write_bytes(b"\0")
    recs = [
        conv("<image>\nWhat?", "A cat.", image="img/a.png", id=7, task="vqa", answer=3),
        conv("Compare.", images=["img/a.png", "img/b.png"]),                     # placeholders prepended
        conv("First <image> then <image>.", images=["img/a.png", "img/b.png"]),  # placeholders kept in place
        conv("Describe.", video=["img/f0.png", "img/f1.png"]),                    # video as frame list
        conv("<video>\nDescribe.", video="v.mp4"),
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "user", "value": "Hi"},
                           {"from": "assistant", "value": "Hello"}]},
    ]
    src = JsonlSource(write_jsonl(tmp_path / "train.jsonl", recs))
    assert len(src) == 6 and src.name == "train"
    s = src.read(0)
    assert s.messages == [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "A cat."}]
    assert s.images == [str(tmp_path / "img" / "a.png")] and s.video is None
    assert (s.source, s.key, s.task, s.answer, s.meta) == ("train", "line 1", "vqa", "3", {"id": 7})
    s = src.read(1)
    assert s.messages[0]["content"] == "<image>\n<image>\nCompare." and len(s.images) == 2
    assert src.read(2).messages[0]["content"] == "First <image> then <image>."
    s = src.read(3)
    assert s.messages[0]["content"] == "<video>\nDescribe." and s.images == []
    assert s.video == [str(tmp_path / "img" / "f0.png"), str(tmp_path / "img" / "f1.png")]
    assert src.read(4).video == str(tmp_path / "v.mp4")
    s = src.read(5)
    assert [m["role"] for m in s.messages] == ["system", "user", "assistant"] and s.key == "line 6"


def test_jsonl_openai_forms(tmp_path):
    png = png_bytes((0, 255, 0))
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    write_png(tmp_path / "pics" / "c.png")
    recs = [
        {"messages": [{"role": "system", "content": "sys"},
                      {"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                   {"type": "text", "text": "What colour?"}]},
                      {"role": "assistant", "content": "Green."}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Left:"},
                                                   {"type": "image", "image": "c.png"},
                                                   {"type": "text", "text": "Right:"},
                                                   {"type": "image_url", "image_url": uri}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "Same."}]}]},
        {"messages": [{"role": "user", "content": "<image>Which?"}, {"role": "assistant", "content": "That."}],
         "images": ["c.png"]},                                    # ShareGPT / LLaMA-Factory style
    ]
    src = JsonlSource(write_jsonl(tmp_path / "oai.jsonl", recs), image_root=tmp_path / "pics", name="oai")
    s = src.read(0)
    assert s.messages[1] == {"role": "user", "content": "<image>\nWhat colour?"} and s.images == [png]
    s = src.read(1)
    assert s.messages[0]["content"] == "Left:\n<image>\nRight:\n<image>"
    assert s.images == [str(tmp_path / "pics" / "c.png"), png] and s.messages[1]["content"] == "Same."
    assert src.read(2).images == [str(tmp_path / "pics" / "c.png")] and src.read(2).source == "oai"


def test_jsonl_bad_records_are_skipped_with_reasons(tmp_path):
    write_png(tmp_path / "a.png")
    lines = [
        conv("<image>\nok", image="a.png"),
        '{"conversations": [{"from": "human", "value": "cut off',               # malformed JSON
        conv("<image>\nx", image="nope.png"),                                     # missing image
        {"conversations": [{"from": "human", "value": "alone"}]},               # no assistant turn
        conv("<image><image>\ntwo?", image="a.png"),                             # placeholder mismatch
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64,@@not base64@@"}}]}, {"role": "assistant", "content": "x"}]},
        "",                                                                        # blank: not a record
        "[1, 2]",                                                                  # JSON, not an object
        {"conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}]},
        {"conversations": "not a list"},
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},
    ]
    src = JsonlSource(write_jsonl(tmp_path / "bad.jsonl", lines))
    assert len(src) == 10  # the blank line is not indexed, line numbers still count it
    assert src.read(0).key == "line 1"
    reasons = [skip_reason(src, i) for i in range(1, 10)]
    assert reasons[0].startswith("malformed JSON: ")
    assert reasons[1] == f"missing image: {tmp_path / 'nope.png'}"
    assert reasons[2] == "no assistant turn"
    assert reasons[3] == "2 <image> placeholders but 1 images"
    assert reasons[4].startswith("bad data URI")
    assert reasons[5].startswith("malformed record")
    assert reasons[6] == "unknown role 'robot'"
    assert reasons[7].startswith("malformed record") and reasons[8].startswith("malformed turn")
    assert [src.key(i) for i in range(5, 8)] == ["line 6", "line 8", "line 9"]
    with pytest.raises(IndexError):
        src.read(10)


def test_jsonl_source_pickles_and_reopens(tmp_path):
    src = JsonlSource(write_jsonl(tmp_path / "t.jsonl", [conv("a"), conv("b", "B")]))
    assert src.read(0).messages[0]["content"] == "a"  # opens a handle
    clone = pickle.loads(pickle.dumps(src))
    assert clone.read(1).messages[1]["content"] == "B" and len(clone) == 2
    src.close()


def test_jsonl_plain_text_records(tmp_path):
    """{"text"} and {"prompt", "completion"} records (no turns, no media) are text samples; bad ones are skips."""
    write_png(tmp_path / "a.png")
    lines = [{"text": "a document", "task": "t"}, {"prompt": "K:1.K=", "completion": "1", "id": 7},
             {"text": 5}, {"completion": "x"}, {"text": "x", "image": "a.png"}, {"text": " "},
             {"prompt": ["K"], "completion": "1"}, {"text": "x", **conv("hi")}]
    src = JsonlSource(write_jsonl(tmp_path / "t.jsonl", lines))
    doc, pair = src.read(0), src.read(1)
    assert (doc.text, doc.prompt, doc.messages, doc.task) == ("a document", None, [], "t")
    assert (pair.text, pair.prompt, pair.meta) == ("1", "K:1.K=", {"id": 7})
    reasons = [skip_reason(src, i) for i in range(2, 7)]
    assert reasons[0] == "malformed record: 'text' is a int, not a string"
    assert reasons[1] == "malformed record: a 'completion' without its 'prompt'"
    assert reasons[2] == "malformed record: a text record cannot carry images or video"
    assert reasons[3] == "a text sample needs a non-empty text (completion)"
    assert reasons[4] == "malformed record: 'prompt' is a list, not a string"
    assert skip_reason(src, 7) == "malformed record: both turns and plain text ('text' / 'completion')"


def test_jsonl_missing_file_and_crlf(tmp_path):
    with pytest.raises(FileNotFoundError):
        JsonlSource(tmp_path / "none.jsonl")
    p = tmp_path / "crlf.jsonl"
    p.write_bytes(("\ufeff" + json.dumps(conv("a")) + "\r\n\r\n" + json.dumps(conv("b"))).encode())
    src = JsonlSource(p)
    assert len(src) == 2 and src.read(0).messages[0]["content"] == "a" and src.key(1) == "line 3"


# ------------------------------------------------------------------------------------------------ tar
def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_tar(path: Path, groups: dict[str, dict[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for key, members in groups.items():
            for ext, data in members.items():
                add_member(tf, f"{key}.{ext}", data)
    return path


def js(rec) -> bytes:
    return json.dumps(rec).encode()


def test_webdataset_groups_and_references(tmp_path):
    red, blue = png_bytes((255, 0, 0)), png_bytes((0, 0, 255))
    write_tar(tmp_path / "shard-0.tar", {
        "000001": {"json": js(conv("<image>\nWhat?", image="000001.png")), "png": red},
        "000002": {"json": js(conv("What?", image="jpg")), "jpg": blue},             # by extension
        "000003": {"json": js(conv("Both?")), "0.png": red, "1.png": blue},         # unreferenced: all images
        "000004": {"png": red},                                                       # no json
        "000005": {"json": js(conv("<image>\n?", image="000005.webp"))},              # missing member
    })
    write_tar(tmp_path / "shard-1.tar", {"dir/000006": {"json": js(conv("text only"))}})
    src = WebDatasetSource(str(tmp_path / "shard-*.tar"))
    assert len(src) == 6 and src.name == "shard-*"
    s = src.read(0)
    assert s.images == [red] and s.key == "shard-0.tar:000001" and s.messages[0]["content"] == "<image>\nWhat?"
    assert src.read(1).images == [blue] and src.read(1).messages[0]["content"] == "<image>\nWhat?"
    assert src.read(2).images == [red, blue] and src.read(2).messages[0]["content"].startswith("<image>\n<image>\n")
    assert skip_reason(src, 3) == "no .json member"
    assert skip_reason(src, 4) == "missing image: 000005.webp"
    assert src.key(5) == "shard-1.tar:dir/000006" and src.read(5).images == []
    assert pickle.loads(pickle.dumps(src)).read(0).images == [red]


def test_webdataset_truncated_tail_keeps_readable_part(tmp_path):
    red = png_bytes()
    groups = {f"{i:06d}": {"json": js(conv("<image>\nq", image="png")), "png": red + b"\0" * 3000}
              for i in range(5)}
    p = write_tar(tmp_path / "t.tar", groups)
    data = p.read_bytes()
    with tarfile.open(p) as tf:
        png2 = tf.getmember("000002.png")
        boundary = tf.getmember("000002.json").offset  # where the third group starts
    p.write_bytes(data[: png2.offset_data + 100])  # cut inside the third group's png data
    with pytest.warns(RuntimeWarning, match="damaged tar"):
        src = WebDatasetSource(p)
    assert len(src) == 3 and "member 000002.png truncated" in src.errors[0]
    assert skip_reason(src, 2) == "missing image: png"
    assert src.read(0).images[0][:8] == red[:8] and src.read(1).key == "t.tar:000001"
    p.write_bytes(data[:boundary])  # cut at a member boundary: only the missing end marker tells
    with pytest.warns(RuntimeWarning, match="no end-of-archive marker"):
        assert len(WebDatasetSource(p)) == 2


def test_webdataset_garbage_in_the_middle_and_unreadable(tmp_path):
    p = write_tar(tmp_path / "g.tar", {f"{i:06d}": {"json": js(conv(f"q{i}"))} for i in range(4)})
    data = bytearray(p.read_bytes())
    data[512 * 4: 512 * 5] = b"\x07" * 512  # the third member's header
    p.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning):
        src = WebDatasetSource(p)
    assert len(src) == 2 and "unreadable data" in src.errors[0]
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(ValueError, match="nothing readable"):
        WebDatasetSource(junk)
    with pytest.warns(RuntimeWarning, match="junk.tar"):  # one bad shard among good ones: a warning
        assert len(WebDatasetSource([p, junk])) == 2
    with pytest.raises(FileNotFoundError):
        WebDatasetSource(str(tmp_path / "none-*.tar"))


# ------------------------------------------------------------------------------------------------ parquet
def test_parquet_layouts(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    red, blue = png_bytes((255, 0, 0)), png_bytes((0, 0, 255))
    c = conv("<image>\nWhat?", "Red.")["conversations"]
    table = pa.table({
        "conversations": [json.dumps(c), json.dumps(c), "{broken", json.dumps(conv("no image")["conversations"])],
        "image": [{"bytes": red, "path": "a.png"}, {"bytes": blue, "path": None}, None, None],
        "task": ["color", "color", None, None],
    })
    pq.write_table(table, tmp_path / "hf.parquet", row_group_size=3)
    src = ParquetSource(tmp_path / "hf.parquet")
    assert len(src) == 4 and src.name == "hf"
    s = src.read(0)
    assert s.images == [red] and s.task == "color" and s.key == "hf.parquet:row 0"
    assert src.read(1).images == [blue]
    assert skip_reason(src, 2).startswith("malformed JSON")
    assert src.read(3).images == [] and src.key(3) == "hf.parquet:row 3"
    assert pickle.loads(pickle.dumps(src)).read(1).images == [blue]

    msgs = [{"role": "user", "content": "<image><image> differ?"}, {"role": "assistant", "content": "yes"}]
    pq.write_table(pa.table({"messages": [msgs, msgs], "images": [[red, blue], [red]]}), tmp_path / "m.parquet")
    src = ParquetSource(tmp_path / "m.parquet")
    assert src.read(0).images == [red, blue]
    assert skip_reason(src, 1) == "2 <image> placeholders but 1 images"

    # the HF layout: bare {"type": "image"} parts (struct columns: absent fields are null), images column
    parts = [{"type": "image", "text": None}, {"type": "text", "text": "Which is red?"},
             {"type": "image", "text": None}]
    msgs = [{"role": "user", "content": parts}, {"role": "assistant", "content": [{"type": "text", "text": "1"}]}]
    pq.write_table(pa.table({"messages": [msgs, msgs], "images": [[red, blue], [red]]}), tmp_path / "hf2.parquet")
    src = ParquetSource(tmp_path / "hf2.parquet")
    s = src.read(0)
    assert s.images == [red, blue] and s.messages[0]["content"] == "<image>\nWhich is red?\n<image>"
    assert skip_reason(src, 1) == "2 image parts without a reference but 1 top-level images"

    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="neither a 'conversations' nor a 'messages'"):
        ParquetSource(tmp_path / "x.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"nope")
    with pytest.raises(ValueError, match="not a readable parquet"):
        ParquetSource(tmp_path / "bad.parquet")


# ------------------------------------------------------------------------------------------------ open
def test_open_source(tmp_path):
    j = write_jsonl(tmp_path / "a.jsonl", [conv("a")])
    t = write_tar(tmp_path / "b.tar", {"k": {"json": js(conv("b"))}})
    assert isinstance(open_source(j), JsonlSource) and isinstance(open_source(str(t)), WebDatasetSource)
    src = open_source({"path": str(j), "weight": 2.5, "name": "mine", "image_root": str(tmp_path)})
    assert (src.name, src.weight) == ("mine", 2.5)
    assert [(s.name, w) for s, w in open_sources([j, {"path": t, "weight": 3}])] == [("a", 1.0), ("b", 3.0)]
    assert isinstance(open_source({"path": j, "type": "jsonl"}), JsonlSource)
    for bad, msg in [("x.csv", "cannot tell the format"), ({"path": j, "wieght": 1}, "unknown source spec keys"),
                     ({"path": j, "weight": -1}, "weight"), ({"path": j, "weight": "x"}, "weight"),
                     ({"weight": 1}, "no 'path'"),
                     ({"path": t, "image_root": "x"}, "JSONL sources only"), ({"path": j, "type": "csv"}, "type"),
                     (3, "path or a dict")]:
        with pytest.raises(ValueError, match=msg):
            open_source(bad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        open_source(t)  # a clean tar warns about nothing
