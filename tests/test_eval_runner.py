"""The runner end to end: per-item results, summaries and tables, resuming without re-asking finished items,
the OpenAI-compatible endpoint path (against a stdlib HTTP stub), the judge, and `sailvl eval` with a tiny
model on a tiny synthetic task."""

import base64
import io
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from sailvl.cli import main
from sailvl.data.synth import TASKS
from sailvl.data.template import CHOICE_SUFFIX
from sailvl.eval import tasks as T
from sailvl.eval.backends import Completion, EndpointModel
from sailvl.eval.endpoint import ChatClient, EndpointError
from sailvl.eval.judge import Judge
from sailvl.eval.runner import read_results, run_task, run_tasks
from sailvl.eval.tasks import TaskSpec, resolve_tasks


class Scripted:
    """A backend that answers by a rule and records what it was asked; can fail on its k-th call."""

    name = "scripted"

    def __init__(self, answer=lambda prompt: "a", fail_on_call=None, error_for=()):
        self.answer, self.fail_on_call, self.error_for = answer, fail_on_call, set(error_for)
        self.prompts = []

    def generate(self, requests, settings, think):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("killed")
        self.prompts += [r.prompt for r in requests]
        return [Completion(error="boom") if r.prompt.split("\n")[0] in self.error_for else Completion(self.answer(r.prompt))
                for r in requests]


def questions(tmp_path, n=10):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "question": f"q{i}", "answer": f"a{i}",
                                        "category": "even" if i % 2 == 0 else "odd"}) + "\n" for i in range(n)))
    return path


def right_if_even(prompt):
    i = int(prompt.split("\n")[0][1:])
    return f"a{i}" if i % 2 == 0 else "wrong"


def test_interrupted_run_resumes_without_reasking(tmp_path):
    (spec,) = resolve_tasks(str(questions(tmp_path)))
    out = tmp_path / "out"
    first = Scripted(right_if_even, fail_on_call=3)
    with pytest.raises(RuntimeError, match="killed"):
        run_task(first, spec, out, batch_size=3, progress=False)
    assert len(first.prompts) == 6 and len(read_results(out / "qa" / "results.jsonl")) == 6
    with open(out / "qa" / "results.jsonl", "a") as f:
        f.write('{"id": "q7", "sco')  # a line torn by the kill
    second = Scripted(right_if_even)
    summary = run_task(second, spec, out, batch_size=3, progress=False)
    assert [p.split("\n")[0] for p in second.prompts] == ["q6", "q7", "q8", "q9"]
    assert summary["n_scored"] == 10 and summary["n_missing"] == 0 and summary["score"] == 0.5
    assert summary["categories"] == {"even": {"n": 5, "score": 1.0}, "odd": {"n": 5, "score": 0.0}}
    third = Scripted(right_if_even)
    assert run_task(third, spec, out, batch_size=3, progress=False)["score"] == 0.5 and third.prompts == []
    other = Scripted(right_if_even)
    other.name = "another-model"
    with pytest.raises(ValueError, match="other settings.*model: 'scripted' -> 'another-model'"):
        run_task(other, spec, out, progress=False)


def test_items_that_failed_are_retried_and_reported(tmp_path):
    (spec,) = resolve_tasks(str(questions(tmp_path, 4)))
    out = tmp_path / "out"
    summary = run_task(Scripted(right_if_even, error_for={"q2"}), spec, out, progress=False)
    assert summary["n_errors"] == 1 and summary["score"] == 0.25
    rec = read_results(out / "qa" / "results.jsonl")["q2"]
    assert rec["error"] == "boom" and rec["score"] == 0.0 and rec["answer"] is None
    again = Scripted(right_if_even)
    summary = run_task(again, spec, out, progress=False)
    assert [p.split("\n")[0] for p in again.prompts] == ["q2"] and summary["n_errors"] == 0 and summary["score"] == 0.5
    table = (out / "qa" / "summary.md").read_text()
    assert "| **overall** | 4 | **50.00** |" in table and "| even | 2 | 100.00 |" in table


def test_all_synth_tasks_on_generated_data(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "SYNTH_ITEMS_PER_TASK", 1)
    specs = resolve_tasks("synth")
    summaries = run_tasks(Scripted(lambda p: "red"), specs, tmp_path, progress=False)
    assert len(summaries) == len(TASKS) and all(s["n_scored"] == 1 for s in summaries)
    assert (tmp_path / "synth-data" / "test.jsonl").exists()
    overview = (tmp_path / "summary.md").read_text()
    assert "| synth/vqa_color | exact_match | 1 |" in overview and "| synth/grounding | grounding | 1 |" in overview
    assert len(json.loads((tmp_path / "summary.json").read_text())) == len(TASKS)


# ------------------------------------------------------------------------------------- endpoint path
@pytest.fixture
def stub_server():
    """An OpenAI-compatible stub: server.reply(body) -> text, or an int HTTP status to fail with."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            reply = server.reply(body)
            if isinstance(reply, int):
                self.send_response(reply)
                self.end_headers()
                self.wfile.write(b'{"error": "no"}')
                return
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.requests, server.reply = [], lambda body: "A"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _text(body) -> str:
    content = body["messages"][0]["content"]
    return content if isinstance(content, str) else " ".join(p["text"] for p in content if p["type"] == "text")


def mcq_file(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(buf, format="PNG")
    (tmp_path / "blue.png").write_bytes(buf.getvalue())
    rows = [{"id": "q1", "question": "Colour one?", "image": "blue.png", "answer": "B", "options": {"A": "red", "B": "blue"}},
            {"id": "q2", "question": "Colour two?", "image": "blue.png", "answer": "A", "options": {"A": "red", "B": "blue"}},
            {"id": "q3", "question": "Colour three?", "image": "blue.png", "answer": "A", "options": {"A": "red", "B": "blue"}},
            {"id": "q4", "question": "Colour four?", "image": "blue.png", "answer": "A", "options": {"A": "red", "B": "blue"}}]
    path = tmp_path / "mcq.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, buf.getvalue()


def test_endpoint_backend_with_judge(tmp_path, stub_server):
    path, png = mcq_file(tmp_path)
    url = f"http://127.0.0.1:{stub_server.server_port}"

    def reply(body):
        if body["model"] == "judge":
            return "A"
        text = _text(body)
        return {"Colour one?": "The answer is B", "Colour two?": "hmm, unclear", "Colour three?": "B."}.get(
            text.split("\n")[0], 400)

    stub_server.reply = reply
    (spec,) = resolve_tasks(str(path))
    backend = EndpointModel(url, "vlm", api_key="k", concurrency=4)
    judge = Judge(ChatClient(url + "/v1", "judge"))
    summary = run_task(backend, spec, tmp_path / "out", batch_size=4, judge=judge, progress=False)
    assert summary["score"] == 0.5 and summary["judge_used"] == 1 and summary["n_errors"] == 1
    assert summary["rule_extracted"] == pytest.approx(2 / 3)
    assert summary["judge"] == {"endpoint": url + "/v1/chat/completions", "model": "judge"}
    recs = read_results(tmp_path / "out" / "mcq" / "results.jsonl")
    assert recs["q2"]["extracted_by"] == "judge" and recs["q2"]["answer"] == "A" and recs["q2"]["score"] == 1.0
    assert recs["q3"]["answer"] == "B" and recs["q3"]["score"] == 0.0 and "HTTP 400" in recs["q4"]["error"]
    vlm = [r for r in stub_server.requests if r["body"]["model"] == "vlm"]
    assert len(vlm) == 4 and all(r["path"] == "/v1/chat/completions" and r["auth"] == "Bearer k" for r in vlm)
    parts = next(r for r in vlm if "Colour one?" in _text(r["body"]))["body"]["messages"][0]["content"]
    assert parts[0] == {"type": "image_url",
                        "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}
    assert parts[1] == {"type": "text", "text": "Colour one?\nA. red\nB. blue" + CHOICE_SUFFIX}
    assert vlm[0]["body"]["temperature"] == 0.0 and vlm[0]["body"]["max_tokens"] == spec.generation.max_new_tokens


def test_unreachable_endpoint_stops_the_run(tmp_path):
    path, _ = mcq_file(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    (spec,) = resolve_tasks(str(path))
    backend = EndpointModel(f"http://127.0.0.1:{port}", "vlm", retries=0)
    with pytest.raises(EndpointError, match="no answer after 1 tries"):
        run_task(backend, spec, tmp_path / "out", progress=False)


def test_cli_endpoint_and_errors(tmp_path, stub_server, capsys):
    path, _ = mcq_file(tmp_path)
    stub_server.reply = lambda body: "A"
    url = f"http://127.0.0.1:{stub_server.server_port}/v1"
    assert main(["eval", "--endpoint", url, "--api-model", "vlm", "--task", str(path), "--out", str(tmp_path / "o"),
                 "--limit", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| mcq | choice | 2 | 50.00 | 100.0% | 0 | 0 |" in out
    assert main(["eval", "--model", str(tmp_path / "nope"), "--task", str(path)]) == 1
    assert "no model directory" in capsys.readouterr().err
    assert main(["eval", "--endpoint", url, "--api-model", "vlm", "--task", "MMstar"]) == 1
    assert "did you mean 'MMStar'" in capsys.readouterr().err
    assert main(["eval", "--endpoint", url, "--task", str(path)]) == 1
    assert "--api-model" in capsys.readouterr().err


def test_task_spec_files(tmp_path):
    q = questions(tmp_path, 2)
    spec = TaskSpec(name="mine", data=q.name, metric="accuracy", version="3")
    (tmp_path / "mine.json").write_text(json.dumps(spec.to_dict()))
    (loaded,) = resolve_tasks(str(tmp_path / "mine.json"))
    assert loaded.metric == "accuracy" and loaded.version == "3" and loaded.data == str(q)
    (tmp_path / "bad.json").write_text(json.dumps({"name": "x", "metrc": "anls"}))
    with pytest.raises(ValueError, match="unknown TaskSpec fields"):
        resolve_tasks(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="unknown metric"):
        TaskSpec(name="x", metric="bleu")


# --------------------------------------------------------------------------- a tiny model, end to end
@pytest.fixture
def model_dir(tmp_path, bpe_dir):
    from sailvl.config import tiny_config
    from sailvl.data.processor import Processor, ProcessorConfig
    from sailvl.data.tokenizer import load_tokenizer
    from sailvl.model.vlm import SailVL

    tok = load_tokenizer(bpe_dir)
    cfg = tiny_config(vocab_size=512)
    cfg.img_context_token_id = tok.token_to_id("<IMG_CONTEXT>")
    path = tmp_path / "model"
    SailVL(cfg).eval().save_pretrained(path)
    Processor(tok, ProcessorConfig(image_size=64, patch_size=8, max_dynamic_patch=1)).save_pretrained(path, bpe_dir)
    return path


def test_tiny_model_on_synthetic_tasks_matches_the_demo_evaluation(tmp_path, model_dir, capsys):
    import sailvl
    from sailvl.data.synth import generate
    from sailvl.eval.synth import evaluate

    # 2 items each; scene_qa is multi-turn (the item asks the last question with the conversation before it)
    generate(tmp_path / "syn", 6, seed=0, split="test", tasks=["vqa_color", "math_cot", "scene_qa"])
    data, out = tmp_path / "syn" / "test.jsonl", tmp_path / "out"
    argv = ["eval", "--model", str(model_dir), "--task", "synth/vqa_color", "synth/math_cot", "synth/scene_qa",
            "--data", str(data), "--out", str(out), "--max-new-tokens", "5", "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| synth/vqa_color | exact_match | 2 |" in printed and "| synth/math_cot | exact_match | 2 |" in printed
    results = [json.loads(x) for x in (out / "synth-math_cot" / "results.jsonl").read_text().splitlines()]
    assert len(results) == 2 and {"id", "prompt", "output", "answer", "score", "gold"} <= set(results[0])
    assert results[0]["prompt"].startswith("<image>\nSolve the problem in the image.")
    summary = json.loads((out / "synth-vqa_color" / "summary.json").read_text())
    assert summary["model"] == str(model_dir.resolve()) and summary["version"] == "1" and summary["judge"] is None
    assert summary["generation"]["max_new_tokens"] == 5 and summary["prompt_template"] == "{question}"
    assert summary["rule_extracted"] == 1.0 and "### synth/vqa_color" in (out / "summary.md").read_text()

    # the same greedy outputs and scores as the demo's in-process evaluation
    pipe = sailvl.load(model_dir)
    evaluate(pipe.model, pipe.processor, data, limit_per_task=2, max_new_tokens=5, thinking_tokens=5,
             out_jsonl=tmp_path / "demo.jsonl")
    demo = [json.loads(x) for x in (tmp_path / "demo.jsonl").read_text().splitlines()]
    for task in ("vqa_color", "math_cot", "scene_qa"):
        ours = [json.loads(x) for x in (out / f"synth-{task}" / "results.jsonl").read_text().splitlines()]
        theirs = [r for r in demo if r["task"] == task]
        assert [r["output"] for r in ours] == [r["output"] for r in theirs]
        assert [r["score"] for r in ours] == [r["score"] for r in theirs]

    size = (out / "synth-vqa_color" / "results.jsonl").stat().st_size
    assert main(argv) == 0  # resumed: nothing left to ask
    assert (out / "synth-vqa_color" / "results.jsonl").stat().st_size == size


def test_questions_that_ask_for_thinking_get_the_thinking_budget(tmp_path, model_dir, monkeypatch):
    """World(scene_trace="caption") questions end with the thinking instruction: the demo's evaluation gives them the
    thinking budget and scores the reply's boxed answer; direct questions keep the short budget."""
    import sailvl
    import sailvl.eval.synth as ES
    from sailvl.data.synth import generate
    from sailvl.data.synth.world import World
    from sailvl.model.generate import GenerationOutput

    generate(tmp_path / "syn", 8, seed=0, split="test", tasks=["vqa_color", "ocr"],
             world=World(scene_trace="caption"))
    budgets = []  # one call per task (fewer items than a batch), tasks in sorted order: ocr, vqa_color

    def fake_generate(model, prompts, gen, pixel_values=None, decode=None):
        budgets.append(gen.max_new_tokens)
        reply = "<think>\nx\n</think>\n\nThe answer is \\boxed{red}."
        return GenerationOutput([[] for _ in prompts], ["stop"] * len(prompts), texts=[reply] * len(prompts))

    monkeypatch.setattr(ES, "generate", fake_generate)
    pipe = sailvl.load(model_dir)
    out = tmp_path / "eval.jsonl"
    ES.evaluate(pipe.model, pipe.processor, tmp_path / "syn" / "test.jsonl", max_new_tokens=7, thinking_tokens=99,
                out_jsonl=out)
    assert budgets == [7, 99]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    colour = [r for r in rows if r["task"] == "vqa_color"]
    assert colour and all(r["score"] == float(r["answer"] == "red") for r in colour)


def test_chat_keeps_the_images_where_the_question_places_them(model_dir):
    import sailvl

    pipe = sailvl.load(model_dir)
    seen = []

    class Recording:  # the processor, recording the messages chat() builds
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, messages, *args, **kw):
            seen.append(messages[-1]["content"])
            return self.inner(messages, *args, **kw)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    pipe.processor = Recording(pipe.processor)
    red = Image.new("RGB", (64, 64), "red")
    pipe.chat(red, "What colour is it?", max_new_tokens=2)
    pipe.chat(red, "What colour is it?\n<image>", max_new_tokens=2)
    pipe.chat([red, red], "Compare <image> with <image>.", max_new_tokens=2)
    assert seen == ["<image>\nWhat colour is it?", "What colour is it?\n<image>", "Compare <image> with <image>."]


def test_openai_content_places_images_and_video_frames():
    from sailvl.eval.endpoint import chat_url, openai_content

    png = Image.new("RGB", (4, 4), "red")
    parts = openai_content("<image>\nFirst <image> then\n<video>\nWhich moved?", [png, png], video=[png, png, png])
    kinds = [p["type"] for p in parts]
    assert kinds == ["image_url", "text", "image_url", "text", "image_url", "image_url", "image_url", "text"]
    assert [p["text"] for p in parts if p["type"] == "text"] == ["First ", " then\n", "Which moved?"]
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    with pytest.raises(ValueError, match="2 images but 1"):
        openai_content("<image>\nq", [png, png])
    with pytest.raises(ValueError, match="as a list of frames"):
        openai_content("<video>\nq", [], video="clip.mp4")
    assert chat_url("http://h:1") == chat_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"


def test_openai_messages_give_each_turn_its_own_images():
    from sailvl.eval.endpoint import openai_messages

    png = Image.new("RGB", (4, 4), "red")
    conv = [{"role": "user", "content": "<image>\nWhat colour?"}, {"role": "assistant", "content": "red"},
            {"role": "user", "content": "And this <image> one?"}]
    msgs = openai_messages(conv, [png, png])
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"] and msgs[1]["content"] == "red"
    assert [p["type"] for p in msgs[0]["content"]] == ["image_url", "text"]
    assert [p["type"] for p in msgs[2]["content"]] == ["text", "image_url", "text"]
    with pytest.raises(ValueError, match="3 images but 2"):
        openai_messages(conv, [png, png, png])
