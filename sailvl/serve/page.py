"""The chat page served at `/`: plain HTML + JS, no build step. Upload an image, ask, watch the answer stream
in (it calls /v1/chat/completions with stream: true and keeps the conversation history)."""

import html
import json

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>sailvl chat</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 760px; margin: 2em auto; padding: 0 1em; color: #222; }
  #log { border: 1px solid #ccc; border-radius: 6px; padding: 0.5em 1em; min-height: 8em; margin-bottom: 1em; }
  .turn { margin: 0.6em 0; white-space: pre-wrap; }
  .user { color: #0b4f9c; }
  .answer { color: #222; }
  .turn img { max-width: 160px; max-height: 120px; display: block; margin: 0.3em 0; }
  textarea { width: 100%; box-sizing: border-box; }
  .row { display: flex; gap: 1em; align-items: center; flex-wrap: wrap; margin: 0.5em 0; }
  #status { color: #666; font-size: 0.9em; }
</style>
</head>
<body>
<h1>sailvl chat <small style="font-weight:normal;font-size:0.5em">{{MODEL_HTML}}</small></h1>
<div id="log"></div>
<div class="row"><label>Image <input type="file" id="image" accept="image/png,image/jpeg,image/webp,image/gif"></label></div>
<textarea id="question" rows="3" placeholder="Ask about the image..."></textarea>
<div class="row">
  <button id="send">Send</button>
  <button id="reset">New chat</button>
  <label><input type="checkbox" id="think"> thinking</label>
  <label>temperature <input type="number" id="temperature" value="0.7" min="0" max="2" step="0.1" style="width:4em"></label>
  <label>max tokens <input type="number" id="max_tokens" value="256" min="1" style="width:5em"></label>
  <label>API key <input type="password" id="apikey" style="width:8em"></label>
</div>
<div id="status">idle</div>
<script>
const MODEL = {{MODEL_JSON}};
let history = [];
const $ = (id) => document.getElementById(id);

function readImage(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(file);
  });
}

function addTurn(cls, text, imageUrl) {
  const div = document.createElement("div");
  div.className = "turn " + cls;
  if (imageUrl) { const img = document.createElement("img"); img.src = imageUrl; div.appendChild(img); }
  const span = document.createElement("span");
  span.textContent = text;
  div.appendChild(span);
  $("log").appendChild(div);
  return span;
}

async function send() {
  const question = $("question").value.trim();
  const file = $("image").files[0];
  if (!question && !file) return;
  $("send").disabled = true;
  $("status").textContent = "streaming";
  const content = [];
  let imageUrl = null;
  if (file) { imageUrl = await readImage(file); content.push({type: "image_url", image_url: {url: imageUrl}}); }
  if (question) content.push({type: "text", text: question});
  addTurn("user", question, imageUrl);
  const answer = addTurn("answer", "");
  const messages = history.concat([{role: "user", content: content}]);
  const headers = {"Content-Type": "application/json"};
  if ($("apikey").value) headers["Authorization"] = "Bearer " + $("apikey").value;
  const body = {model: MODEL, messages: messages, stream: true, thinking: $("think").checked,
                temperature: parseFloat($("temperature").value), max_tokens: parseInt($("max_tokens").value)};
  let text = "";
  try {
    const resp = await fetch("/v1/chat/completions", {method: "POST", headers: headers, body: JSON.stringify(body)});
    if (!resp.ok) {
      const err = await resp.json().catch(() => ({error: {message: resp.statusText}}));
      throw new Error(err.error ? err.error.message : resp.statusText);
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) !== -1) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const c of chunk.choices) {
          if (c.delta && c.delta.content) { text += c.delta.content; answer.textContent = text; }
        }
      }
    }
    history = messages.concat([{role: "assistant", content: text}]);
    $("question").value = "";
    $("image").value = "";
    $("status").textContent = "done";
  } catch (e) {
    answer.textContent = text;
    $("status").textContent = "error: " + e.message;
  } finally {
    $("send").disabled = false;
  }
}

$("send").addEventListener("click", send);
$("question").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); } });
$("reset").addEventListener("click", () => { history = []; $("log").innerHTML = ""; $("status").textContent = "idle"; });
</script>
</body>
</html>
"""


def render_page(model_name: str) -> str:
    """The page for a served model name (escaped for HTML and for the script)."""
    return (PAGE.replace("{{MODEL_HTML}}", html.escape(model_name))
            .replace("{{MODEL_JSON}}", json.dumps(model_name).replace("<", "\\u003c")))
