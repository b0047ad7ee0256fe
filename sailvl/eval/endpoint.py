"""A minimal OpenAI-compatible chat-completions client (stdlib urllib; works with our server, vLLM, SGLang,
OpenAI, ...) and the conversion of a prompt with `<image>` / `<video>` placeholders into OpenAI content parts
(images as `data:` URI `image_url` parts; a video as its frames, one image part each)."""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ..data.schema import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER

_MAGIC = [(b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"),
          (b"BM", "image/bmp")]


class EndpointError(RuntimeError):
    """The server cannot be reached or keeps failing: the run stops (and can be resumed)."""


def image_bytes(ref: Any) -> bytes:
    """Encoded image bytes of a path, bytes or PIL image (PIL images are encoded as PNG)."""
    if isinstance(ref, (bytes, bytearray)):
        return bytes(ref)
    if isinstance(ref, (str, Path)):
        return Path(ref).read_bytes()
    if hasattr(ref, "save"):
        buf = io.BytesIO()
        ref.save(buf, format="PNG")
        return buf.getvalue()
    raise ValueError(f"cannot send an image of type {type(ref).__name__}")


def data_uri(ref: Any) -> str:
    data = image_bytes(ref)
    mime = next((m for magic, m in _MAGIC if data.startswith(magic)), None)
    if mime is None:
        mime = "image/webp" if data[:4] == b"RIFF" and data[8:12] == b"WEBP" else "image/png"
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def openai_content(prompt: str, images: list, video: Any = None) -> list[dict]:
    """Text and image parts in prompt order; a newline right after a placeholder is absorbed."""
    frames = []
    if video is not None:
        if not isinstance(video, (list, tuple)):
            raise ValueError("an endpoint gets a video as a list of frames; this one is a file")
        frames = list(video)
    parts: list[dict] = []
    pending, k, text = [], 0, prompt
    while text:
        cut = [i for i in (text.find(IMAGE_PLACEHOLDER), text.find(VIDEO_PLACEHOLDER)) if i >= 0]
        if not cut:
            pending.append(text)
            break
        i = min(cut)
        pending.append(text[:i])
        is_image = text.startswith(IMAGE_PLACEHOLDER, i)
        text = text[i + len(IMAGE_PLACEHOLDER if is_image else VIDEO_PLACEHOLDER):]
        text = text.removeprefix("\n")
        if "".join(pending):
            parts.append({"type": "text", "text": "".join(pending)})
        pending = []
        if is_image:
            if k >= len(images):
                raise ValueError(f"the prompt has more {IMAGE_PLACEHOLDER} placeholders than images ({len(images)})")
            parts.append({"type": "image_url", "image_url": {"url": data_uri(images[k])}})
            k += 1
        else:
            parts += [{"type": "image_url", "image_url": {"url": data_uri(f)}} for f in frames]
    if "".join(pending):
        parts.append({"type": "text", "text": "".join(pending)})
    if k != len(images):
        raise ValueError(f"{len(images)} images but {k} {IMAGE_PLACEHOLDER} placeholders")
    return parts


def openai_messages(messages: list[dict], images: list, video: Any = None) -> list[dict]:
    """A conversation ({"role", "content"} with placeholders) as OpenAI messages: each user turn gets the
    images of its own placeholders as parts; other turns stay text."""
    out, k = [], 0
    for m in messages:
        text = m["content"]
        if m["role"] != "user":
            out.append({"role": m["role"], "content": text})
            continue
        n = text.count(IMAGE_PLACEHOLDER)
        has_video = VIDEO_PLACEHOLDER in text
        out.append({"role": "user", "content": openai_content(text, images[k:k + n], video if has_video else None)})
        k += n
    if k != len(images):
        raise ValueError(f"{len(images)} images but {k} {IMAGE_PLACEHOLDER} placeholders in the conversation")
    return out


def chat_url(url: str) -> str:
    """Accept "http://host:port", ".../v1" or the full ".../v1/chat/completions"."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


class ChatClient:
    """POST /v1/chat/completions; retries connection failures, 429 and 5xx with exponential backoff."""

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 600.0,
                 retries: int = 3, backoff_s: float = 1.0):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"endpoint URL must start with http:// or https://, got {url!r}")
        self.url, self.model, self.api_key = chat_url(url), model, api_key
        self.timeout, self.retries, self.backoff_s = timeout, retries, backoff_s

    def complete(self, content: str | list[dict], max_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0) -> str:
        """The assistant text for one user turn (`content`), or for a whole conversation (a list of
        {"role", "content"} messages). Raises EndpointError when the server is unreachable or keeps
        failing, ValueError for a request the server rejects (4xx) or a malformed reply."""
        is_messages = isinstance(content, list) and content and all("role" in m for m in content)
        messages = content if is_messages else [{"role": "user", "content": content}]
        body = {"model": self.model, "messages": messages,
                "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode()
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    reply = json.loads(resp.read().decode("utf-8"))
                break
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:300]
                if e.code != 429 and e.code < 500:
                    raise ValueError(f"{self.url} rejected the request: HTTP {e.code}: {detail}") from None
                last = f"HTTP {e.code}: {detail}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = str(getattr(e, "reason", e))
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.url} answered with invalid JSON: {e}") from None
        else:
            raise EndpointError(f"{self.url}: no answer after {self.retries + 1} tries ({last})")
        try:
            text = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"{self.url}: unexpected reply shape {str(reply)[:200]}") from None
        return text if isinstance(text, str) else ""
