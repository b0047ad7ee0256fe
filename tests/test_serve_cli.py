"""`sailvl chat` (one-shot, thinking, interactive with /image, /think, /reset), `sailvl caption` (bad images
reported, resume after a finished or a torn run) and `sailvl serve` as a real process."""

import io
import json
import socket
import subprocess
import sys

import httpx
import pytest

from sailvl.cli import main
from sailvl.serve.chat import ChatSession, interactive
from sailvl.serve.sampling import SamplingParams
from sailvl.serve.server import wait_healthy

from .test_serve_engine import load, make_model_dir, picture


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, bpe_dir):
    return make_model_dir(tmp_path_factory.mktemp("model"), bpe_dir)


@pytest.fixture(scope="module")
def engine(model_dir):
    return load(model_dir)


def greedy(engine, messages, images=(), max_new=10, thinking=False):
    p = engine.prepare(messages, list(images), thinking=thinking)
    return engine.generate(p, SamplingParams(max_new_tokens=max_new)).choices[0]


def test_chat_one_shot_streams_the_greedy_answer(model_dir, engine, tmp_path, capsys):
    img = tmp_path / "a.png"
    picture().save(img)
    assert main(["chat", "--model", str(model_dir), "--image", str(img), "--max-new-tokens", "10", "What is it?"]) == 0
    ref = greedy(engine, [{"role": "user", "content": "<image>\nWhat is it?"}], [img])
    assert ref.text and capsys.readouterr().out == ref.text + "\n"
    assert main(["chat", "--model", str(model_dir), "--think", "--max-new-tokens", "6", "Solve 1+1."]) == 0
    ref = greedy(engine, [{"role": "user", "content": "Solve 1+1."}], max_new=6, thinking=True)
    assert capsys.readouterr().out == f"{ref.text}\n[answer] {ref.answer}\n"
    assert main(["chat", "--model", str(model_dir), "--image", str(tmp_path / "missing.png"), "hi"]) == 1


def test_interactive_chat_keeps_history(model_dir, engine, tmp_path, monkeypatch, capsys):
    img = tmp_path / "b.png"
    picture(90, 90, (10, 10, 220)).save(img)
    lines = [f"/image {img}", "What is it?", "/image nope.png", "/think maybe", "And then?", "/reset", "/frob",
             "/think on", "hi"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["chat", "--model", str(model_dir), "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    a1 = greedy(engine, [{"role": "user", "content": "<image>\nWhat is it?"}], [img], 8).text
    a2 = greedy(engine, [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": a1},
                         {"role": "user", "content": "And then?"}], [img], 8).text
    a3 = greedy(engine, [{"role": "user", "content": "hi"}], max_new=8, thinking=True)
    for piece in (f"(attached {img})", a1 + "\n", "(cannot use that image", "(usage: /think on|off)", a2 + "\n",
                  "(conversation cleared)", "(unknown command", "(thinking on)", a3.text + "\n", "[answer] "):
        assert piece in out
    assert out.index(a1) < out.index(a2) < out.index("(conversation cleared)") < out.rindex(a3.text)


def test_chat_session_api(engine, tmp_path):
    s = ChatSession(engine, SamplingParams(max_new_tokens=5))
    s.attach(picture())
    first = s.ask("What?")
    assert len(s.messages) == 2 and len(s.images) == 1 and not s.pending
    s.ask("More?")
    assert [m["role"] for m in s.messages] == ["user", "assistant"] * 2 and s.messages[1]["content"] == first.text
    text = io.StringIO()
    lines = iter(["/reset", "/quit"])
    interactive(s, read=lambda prompt: next(lines), out=text)
    assert s.messages == [] and s.images == []


def test_caption_reports_bad_images_and_resumes(model_dir, engine, tmp_path, capsys):
    images = tmp_path / "imgs"
    (images / "sub").mkdir(parents=True)
    picture(70, 50).save(images / "a.png")
    picture(50, 90, (0, 0, 0)).save(images / "b.jpg")
    picture(64, 64, (0, 120, 0)).save(images / "sub" / "c.webp")
    (images / "broken.png").write_bytes(b"not an image at all")
    (images / "notes.txt").write_text("ignored")
    out = tmp_path / "caps" / "results.jsonl"
    args = ["caption", "--model", str(model_dir), str(images), "--out", str(out), "--prompt", "Caption it.",
            "--max-new-tokens", "6", "--batch-size", "2"]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "captioned 3 images, skipped 0" in printed.out and "failed 1" in printed.out
    assert "broken.png" in printed.err
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    caps = {r["image"]: r["caption"] for r in recs if "caption" in r}
    assert set(caps) == {"a.png", "b.jpg", "sub/c.webp"}
    assert [r["image"] for r in recs if "error" in r] == ["broken.png"]
    msg = [{"role": "user", "content": "<image>\nCaption it."}]
    assert caps["sub/c.webp"] == greedy(engine, msg, [images / "sub" / "c.webp"], 6).text
    # a finished run: nothing is captioned twice
    assert main(args) == 0
    assert "captioned 0 images, skipped 3" in capsys.readouterr().out
    assert sum("caption" in json.loads(line) for line in out.read_text().splitlines()) == 3
    # a run killed mid-line: the torn record is redone, the rest skipped
    kept = [line for line in out.read_text().splitlines() if '"b.jpg"' not in line]
    out.write_text("\n".join(kept) + '\n{"image": "b.jpg", "capt')
    assert main(args) == 0
    assert "captioned 1 images, skipped 2" in capsys.readouterr().out
    recs = [json.loads(line) for line in out.read_text().splitlines() if line.endswith("}")]
    assert sorted(r["image"] for r in recs if "caption" in r) == ["a.png", "b.jpg", "sub/c.webp"]
    assert main(["caption", "--model", str(model_dir), str(tmp_path / "nowhere"), "--out", str(out)]) == 1


def test_serve_command_runs_a_server(model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "sailvl", "serve", "--model", str(model_dir), "--port", str(port),
                             "--api-key", "k", "--served-model-name", "m", "--max-seqs", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, timeout=120, alive=lambda: proc.poll() is None)
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        assert httpx.post(url + "/v1/chat/completions", json=body, timeout=30).status_code == 401
        r = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer k"}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        proc.wait(30)


def test_chat_with_a_video_of_frames(model_dir, engine, tmp_path, capsys):
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(4):
        picture(64, 64, (60 * i, 0, 200 - 40 * i)).save(frames / f"{i:03d}.png")
    assert main(["chat", "--model", str(model_dir), "--video", str(frames), "--max-new-tokens", "8", "What moves?"]) == 0
    p = engine.prepare([{"role": "user", "content": "<video>\nWhat moves?"}], video=str(frames))
    assert p.num_image_tokens == 4 * 16  # one tile per frame
    ref = engine.generate(p, SamplingParams(max_new_tokens=8)).choices[0].text
    assert ref and capsys.readouterr().out == ref + "\n"
