"""The chat page in headless Chromium (driven over the Chrome DevTools Protocol): upload an image, ask, and the
streamed answer that appears equals the server's answer to the same request; a follow-up uses the history.

Chromium comes from Debian's `chromium` package: installed here with apt-get when absent and running as root,
otherwise the test is skipped with the reason."""

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest

from sailvl.serve.server import ServerConfig, ServerThread, create_app

from .test_serve_engine import load, make_model_dir, picture

MODEL = "page-model"


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    if os.name != "posix" or os.geteuid() != 0 or not shutil.which("apt-get"):
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    for cmd in ([], ["apt-get", "update", "-q"]):  # try the current package lists first
        if cmd:
            subprocess.run(cmd, check=False, env=env, capture_output=True, timeout=600, stdin=subprocess.DEVNULL)
        r = subprocess.run(install, check=False, env=env, capture_output=True, timeout=900, stdin=subprocess.DEVNULL)
        if r.returncode == 0:
            return shutil.which("chromium")
    return None


class DevTools:
    """Just enough of the Chrome DevTools Protocol: commands on one page target."""

    def __init__(self, ws):
        self.ws, self.next_id = ws, 0

    def send(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def js(self, expression: str):
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"waited {timeout} s for {expression}")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    pytest.importorskip("websockets.sync.client", reason="the websockets package (test extra) drives Chromium")
    binary = find_chromium()
    if binary is None:
        pytest.skip("no Chromium: Debian's chromium package is absent and cannot be installed here "
                    "(needs root and apt-get); the web page test did not run")
    profile = Path(tempfile.mkdtemp(prefix="sailvl-chromium-"))
    proc = subprocess.Popen([binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                             "--no-first-run", "--remote-debugging-port=0", "--remote-allow-origins=*",
                             f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.time() > deadline or proc.poll() is not None:
                pytest.fail("Chromium did not start its DevTools endpoint")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json() if t["type"] == "page"]
        from websockets.sync.client import connect

        with connect(pages[0]["webSocketDebuggerUrl"], max_size=2**24, open_timeout=30) as ws:
            yield DevTools(ws)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory, bpe_dir):
    engine = load(make_model_dir(tmp_path_factory.mktemp("model"), bpe_dir)).start()
    with ServerThread(create_app(engine, ServerConfig(MODEL))) as srv:
        yield srv
    engine.stop()


def test_page_uploads_an_image_and_streams_the_answer(browser, server, tmp_path):
    image = tmp_path / "shapes.png"
    picture(120, 80, (20, 160, 40)).save(image)
    b = browser
    b.send("Page.enable")
    b.send("Page.navigate", url=server.url + "/")
    b.wait_for("document.readyState === 'complete' && !!document.getElementById('send')")
    root = b.send("DOM.getDocument")["root"]["nodeId"]
    node = b.send("DOM.querySelector", nodeId=root, selector="#image")["nodeId"]
    b.send("DOM.setFileInputFiles", files=[str(image)], nodeId=node)
    question = "What shape is it?"
    b.js(f"""document.getElementById('question').value = {json.dumps(question)};
             document.getElementById('temperature').value = '0';
             document.getElementById('max_tokens').value = '12';
             document.getElementById('send').click(); true""")
    status = b.wait_for("(s => s === 'done' || s.startsWith('error') ? s : '')"
                        "(document.getElementById('status').textContent)")
    assert status == "done"
    answer = b.js("Array.from(document.querySelectorAll('.answer')).pop().textContent")
    assert b.js("document.querySelectorAll('#log img').length") == 1  # the uploaded image is shown

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    first = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                          {"type": "text", "text": question}]}]
    ref = client.chat.completions.create(model=MODEL, messages=first, temperature=0, max_tokens=12)
    assert ref.choices[0].message.content and answer == ref.choices[0].message.content

    # a follow-up question goes with the history (image included)
    b.js("""document.getElementById('question').value = 'And its colour?';
            document.getElementById('send').click(); true""")
    b.wait_for("document.querySelectorAll('.answer').length === 2 && "
               "document.getElementById('status').textContent === 'done'")
    answer2 = b.js("Array.from(document.querySelectorAll('.answer')).pop().textContent")
    history = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": [
        {"type": "text", "text": "And its colour?"}]}]
    ref2 = client.chat.completions.create(model=MODEL, messages=history, temperature=0, max_tokens=12)
    assert answer2 == ref2.choices[0].message.content
