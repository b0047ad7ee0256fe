"""The OpenAI-compatible server, through the real `openai` client and raw HTTP, against uvicorn on a free port:
completions (plain, streamed, usage, n, seeds, stops, lengths, logprobs), greedy == the engine's greedy,
concurrency == sent alone, every kind of bad input -> the right 4xx with OpenAI's error body (and the server
keeps serving), API keys, /v1/models, /health, /metrics."""

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from sailvl.serve.engine import Engine
from sailvl.serve.protocol import ImagePolicy
from sailvl.serve.sampling import SamplingParams
from sailvl.serve.server import ServerConfig, ServerThread, ThinkingSplitter, create_app

from .test_serve_engine import CONTEXT, load, make_model_dir, picture

MODEL = "tiny-sailvl"


def data_uri(im, fmt="PNG") -> str:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def engine(tmp_path_factory, bpe_dir):
    eng = load(make_model_dir(tmp_path_factory.mktemp("model"), bpe_dir)).start()
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def server(engine):
    policy = ImagePolicy(max_images=2, max_image_pixels=200_000)
    with ServerThread(create_app(engine, ServerConfig(MODEL, images=policy, max_body_bytes=2**20))) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def ask(client, content, **kw):
    kw.setdefault("max_tokens", 12)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def engine_greedy(engine, content: str, images=(), max_new=12):
    text = "<image>\n" * len(images) + content
    p = engine.prepare([{"role": "user", "content": text}], list(images))
    return engine.generate(p, SamplingParams(max_new_tokens=max_new)), p


def image_message(question, *ims):
    return [{"type": "image_url", "image_url": {"url": data_uri(im), "detail": "low"}} for im in ims] + \
        [{"type": "text", "text": question}]


def test_temperature_zero_equals_engine_greedy_and_usage_counts_image_tokens(client, engine):
    r = ask(client, "What colour is the circle?", temperature=0)
    ref, p = engine_greedy(engine, "What colour is the circle?")
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content == ref.choices[0].text
    assert c.finish_reason == ref.choices[0].finish_reason
    assert r.usage.prompt_tokens == len(p.input_ids) and r.usage.completion_tokens == ref.completion_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    im = picture()
    r = ask(client, image_message("What is it?", im), temperature=0)
    ref, p = engine_greedy(engine, "What is it?", [im])
    assert r.choices[0].message.content == ref.choices[0].text
    assert r.usage.prompt_tokens == len(p.input_ids) and r.usage.prompt_tokens_details.image_tokens == 48
    other = ask(client, image_message("What is it?", picture(colour=(0, 200, 0))), temperature=0)
    assert other.choices[0].message.content != r.choices[0].message.content  # the image is seen


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_image_formats(client, engine, fmt):
    im = picture(64, 64)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    url = f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()
    r = ask(client, [{"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": url}}],
            temperature=0)
    buf.seek(0)
    p = engine.prepare([{"role": "user", "content": "What is it?\n<image>"}], [buf.getvalue()])
    assert r.usage.prompt_tokens_details.image_tokens == 16 and r.usage.prompt_tokens == len(p.input_ids)
    assert r.choices[0].message.content == engine.generate(p, SamplingParams(max_new_tokens=12)).choices[0].text


def test_streaming_matches_non_streaming_with_usage(client):
    content = image_message("Describe it.", picture())
    plain = ask(client, content, temperature=0)
    chunks = list(ask(client, content, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == plain.choices[0].message.content
    finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    assert all(ch.usage is None for ch in chunks[:-1]) and len({ch.id for ch in chunks}) == 1
    no_usage = list(ask(client, content, temperature=0, stream=True))
    assert all(ch.choices and ch.usage is None for ch in no_usage)


def test_raw_sse_format(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True,
            "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    objs = [json.loads(e[6:]) for e in events[:-1]]
    assert all(o["object"] == "chat.completion.chunk" and "usage" not in o for o in objs)
    assert objs[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}


def test_n_seed_stop_and_length(client):
    a = ask(client, "red green", n=2, seed=11, temperature=1.0, max_tokens=10)
    b = ask(client, "red green", n=2, seed=11, temperature=1.0, max_tokens=10)
    c = ask(client, "red green", n=1, seed=12, temperature=1.0, max_tokens=10)
    texts = [ch.message.content for ch in a.choices]
    assert [ch.index for ch in a.choices] == [0, 1] and texts == [ch.message.content for ch in b.choices]
    assert texts[0] != texts[1] and texts[1] == c.choices[0].message.content  # choice i uses seed + i
    assert ask(client, "red green", seed=13, temperature=1.0).choices[0].message.content != texts[0]
    full = ask(client, "The answer is", temperature=0, max_tokens=20, extra_body={"ignore_eos": True})
    text = full.choices[0].message.content
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 20
    stop = text[4:7]
    cut = ask(client, "The answer is", temperature=0, max_tokens=20, stop=[stop], extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].message.content == text[:text.find(stop)]
    streamed = "".join(ch.choices[0].delta.content or "" for ch in ask(
        client, "The answer is", temperature=0, max_tokens=20, stop=stop, stream=True, extra_body={"ignore_eos": True}))
    assert streamed == cut.choices[0].message.content
    short = ask(client, "The answer is", temperature=0, max_completion_tokens=3, extra_body={"ignore_eos": True})
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    k = ask(client, "The answer is", temperature=1.0, seed=3, max_tokens=20, extra_body={"top_k": 1})
    assert k.choices[0].message.content == ask(client, "The answer is", temperature=0, max_tokens=20) \
        .choices[0].message.content  # top_k=1 is greedy


def test_logprobs(client):
    r = ask(client, "blue", temperature=0, max_tokens=6, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    entries = r.choices[0].logprobs.content
    assert len(entries) == 6
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
        assert e.logprob <= 0 and e.bytes == list(e.token.encode())
    chunks = list(ask(client, "blue", temperature=0, max_tokens=6, logprobs=True, stream=True,
                      extra_body={"ignore_eos": True}))
    streamed = [e.logprob for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert streamed == pytest.approx([e.logprob for e in entries])
    assert ask(client, "blue", max_tokens=2).choices[0].logprobs is None


def test_thinking_mode_and_separate_reasoning(client, engine):
    r = ask(client, "Solve 2+2.", temperature=0, max_tokens=8, extra_body={"thinking": True})
    p = engine.prepare([{"role": "user", "content": "Solve 2+2."}], thinking=True)
    assert r.usage.prompt_tokens == len(p.input_ids)  # the thinking suffix is in the prompt
    assert r.choices[0].message.content == engine.generate(p, SamplingParams(max_new_tokens=8)).choices[0].text
    kw = {"temperature": 0, "max_tokens": 8,
          "extra_body": {"chat_template_kwargs": {"enable_thinking": True}, "separate_thinking": True}}
    sep = ask(client, "Solve 2+2.", **kw).choices[0].message
    chunks = list(ask(client, "Solve 2+2.", stream=True, **kw))
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert content == sep.content
    # the splitter: streamed in any chunking == all at once
    text = "  <think>\nstep one\n step two  </think>\nso \\boxed{4}"
    whole = ThinkingSplitter()
    whole.feed(text)
    _, reasoning, answer = whole.finish()
    assert (reasoning, answer) == ("step one\n step two", "4")
    parts = ThinkingSplitter()
    got = "".join(parts.feed(ch) for ch in text)
    last, reasoning2, _ = parts.finish()
    assert got + last == reasoning == reasoning2


def test_models_health_metrics_and_page(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    ask(client, "hi", max_tokens=2)
    metrics = httpx.get(server.url + "/metrics").text
    for name in ("sailvl_requests_total{status=\"200\"}", "sailvl_generation_tokens_total", "sailvl_queue_length",
                 "sailvl_request_latency_seconds_bucket", "sailvl_time_to_first_token_seconds_count"):
        assert name in metrics
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "<script>" in page.text and MODEL in page.text


def test_concurrent_requests_equal_requests_sent_alone(client):
    ims = [picture(), picture(100, 100, (0, 90, 200))]
    cases = []
    for i in range(12):
        content = image_message(f"What is shown? {i}", ims[i % 2]) if i % 3 == 0 else f"Tell me about {i} circles."
        greedy = {"max_tokens": 8 + i % 5, "temperature": 0}
        kw = greedy if i % 2 else {"max_tokens": 10, "temperature": 0.9, "seed": i}
        if i % 4 == 1:
            kw["n"] = 2
        cases.append((content, kw))

    def run(case):
        return [c.message.content for c in ask(client, case[0], **case[1]).choices]

    alone = [run(c) for c in cases]
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(run, cases))
    assert together == alone
    assert len({t[0] for t in alone}) > 6


BAD = [  # (body, status, code, param)
    (b"{not json", 400, "invalid_json", None),
    ({"model": MODEL, "messages": "hi"}, 400, "invalid_value", "messages"),
    ({"model": MODEL, "messages": []}, 400, "invalid_value", "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "invalid_value", "messages.0.content"),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_value", "messages.0.role"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, 400, "invalid_value",
     "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400, "invalid_value",
     "temperature"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "invalid_value", "n"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "invalid_value",
     "top_logprobs"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "invalid_value", "stream"),
    ({"model": MODEL, "messages": [{"role": "assistant", "content": "hi"}]}, 400, "invalid_value", "messages"),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found", "model"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x" * (2**20 + 10)}]}, 413, "request_too_large", None),
    ({"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@not base64@@"}}]}]}, 400, "invalid_image",
     "messages.0.content.0"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(b"just some text, not pixels").decode()}}]}]}, 400,
     "invalid_image", "messages.0.content.0"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:text/plain;base64,aGk="}}]}]}, 400, "invalid_image", "messages.0.content.0"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(picture(20, 20))}}] * 3}]}, 400, "too_many_images",
     "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(picture(600, 400))}}]}]}, 400, "invalid_image",
     "messages.0.content.0"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}, 400,
     "remote_images_disabled", "messages.0.content.0"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/hostname"}}]}]}, 400, "local_files_disabled",
     "messages.0.content.0"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "ultra"}}]}]}, 400,
     "invalid_value", "messages.0.content.0.image_url.detail"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "video", "video": "x"}]}]}, 400,
     "invalid_value", "messages.0.content.0"),
    ({"model": MODEL, "messages": [{"role": "system", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(picture(20, 20))}}]}, {"role": "user", "content": "hi"}]},
     400, "invalid_value", "messages.0.content.0"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "look: <image>"}]}, 400, "invalid_value",
     "messages.0.content"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "red " * CONTEXT}]}, 400, "context_length_exceeded",
     "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": CONTEXT}, 400,
     "context_length_exceeded", "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 99}, 400, "invalid_value", "n"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400,
     "unsupported_parameter", "tools"),
]


@pytest.mark.parametrize("body,status,code,param", BAD, ids=range(len(BAD)))
def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, client, body, status, code, param):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["code"] == code and err["param"] == param and err["type"] == "invalid_request_error"
    assert httpx.get(server.url + "/health").status_code == 200
    assert ask(client, "still there?", max_tokens=2).choices[0].finish_reason in ("length", "stop")


def test_openai_client_raises_on_4xx(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="context"):
        ask(client, "hi", max_tokens=CONTEXT)
    with pytest.raises(openai.BadRequestError):
        ask(client, "hi", stream=True, temperature=-1)


def test_unknown_routes_and_methods(server):
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(server.url + "/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_a_full_queue_is_429(engine):
    full = Engine(engine.model, engine.processor, max_queue=0)
    with ServerThread(create_app(full, ServerConfig(MODEL))) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=60,
                       json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 429 and r.json()["error"]["code"] == "server_overloaded"


def test_api_key(engine):
    with ServerThread(create_app(engine, ServerConfig(MODEL, api_key="s3cret"))) as srv:
        for key in (None, "wrong"):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            r = httpx.post(srv.url + "/v1/chat/completions", headers=headers, timeout=60,
                           json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert httpx.get(srv.url + "/v1/models", headers=headers).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=2).usage.completion_tokens >= 1
        assert httpx.get(srv.url + "/health").status_code == 200  # health stays open


def test_remote_and_local_images_when_enabled(engine, tmp_path):
    import functools
    import http.server
    import threading

    im_path = tmp_path / "pic.png"
    picture().save(im_path)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    policy = ImagePolicy(allow_remote=True, allow_local_files=True)
    try:
        with ServerThread(create_app(engine, ServerConfig(MODEL, images=policy))) as srv:
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
            ref = ask(c, image_message("What is it?", picture()), temperature=0).choices[0].message.content
            for url in (f"http://127.0.0.1:{files.server_port}/pic.png", str(im_path), im_path.as_uri()):
                part = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]
                assert ask(c, part, temperature=0).choices[0].message.content == ref
            with pytest.raises(openai.BadRequestError, match="could not fetch"):
                ask(c, [{"type": "image_url", "image_url": {"url": f"http://127.0.0.1:{files.server_port}/no.png"}}])
            with pytest.raises(openai.BadRequestError, match="no such image file"):
                ask(c, [{"type": "image_url", "image_url": {"url": str(tmp_path / "no.png")}}])
    finally:
        files.shutdown()


def test_a_client_that_goes_away_frees_its_sequence(server, engine):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go on"}], "max_tokens": 900, "stream": True,
            "ignore_eos": True}
    before = engine.stats["generated_tokens"]
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = (line for line in r.iter_lines() if line)
        for _ in range(4):  # the role chunk, then tokens
            assert next(lines).startswith("data: ")
        assert engine.num_running == 1
    deadline = time.time() + 30
    while engine.num_running and time.time() < deadline:
        time.sleep(0.05)
    assert engine.num_running == 0 and engine.stats["generated_tokens"] - before < 900  # cancelled, not finished
