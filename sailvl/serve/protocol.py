"""The OpenAI chat-completions protocol: request models (strict types, so a wrong type is a 400 that names
the field), OpenAI-style errors, image parts (data URIs; remote URLs and local files only when enabled),
and the conversion of a request into engine inputs.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..data.image import ImageError, load_image
from ..data.schema import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from .sampling import MAX_TOP_LOGPROBS, SamplingParams

IMAGE_FORMATS = {"PNG", "JPEG", "WEBP", "GIF"}
_DATA_URI = re.compile(r"data:image/(png|jpeg|jpg|webp|gif);base64,(.*)", re.IGNORECASE | re.DOTALL)


class APIError(Exception):
    """An error for the client: HTTP status + OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted, ignored


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part]
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatTemplateKwargs(_Strict):
    enable_thinking: bool | None = None


class ChatRequest(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # extra field (vLLM's): 0 or -1 = off
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    thinking: bool = False  # extra: SAIL-VL2 thinking mode (or chat_template_kwargs.enable_thinking)
    chat_template_kwargs: ChatTemplateKwargs | None = None
    separate_thinking: bool = False  # extra: content = the answer, reasoning_content = the thinking
    ignore_eos: bool = False  # extra: do not stop at <|im_end|> (benchmarks)
    # accepted only at their no-op values
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    tools: list | None = None
    response_format: dict | None = None
    user: str | None = None

    @property
    def thinking_mode(self) -> bool:
        kw = self.chat_template_kwargs
        return self.thinking or bool(kw and kw.enable_thinking)


def parse_request(body: bytes, max_n: int) -> ChatRequest:
    """Raw body -> ChatRequest, or an APIError naming the problem."""
    try:
        req = ChatRequest.model_validate_json(body)
    except ValidationError as e:
        errors = e.errors()
        if errors[0]["type"] == "json_invalid":
            raise APIError(400, f"the request body is not valid JSON: {errors[0]['msg']}", code="invalid_json") from None
        err = max(errors, key=lambda x: len(_field_path(x["loc"])))  # the most specific of the union's errors
        param = ".".join(_field_path(err["loc"])) or None
        raise APIError(400, f"{param}: {err['msg']}" if param else err["msg"], param=param,
                       code="invalid_value") from None
    if req.n > max_n:
        raise APIError(400, f"n must be <= {max_n}, got {req.n}", param="n", code="invalid_value")
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise APIError(400, "stop: up to 4 non-empty strings", param="stop", code="invalid_value")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name):
            raise APIError(400, f"{name} is not supported", param=name, code="unsupported_parameter")
    if req.tools:
        raise APIError(400, "tools are not supported", param="tools", code="unsupported_parameter")
    if req.response_format and req.response_format.get("type") not in (None, "text"):
        raise APIError(400, "only response_format {'type': 'text'} is supported", param="response_format",
                       code="unsupported_parameter")
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
    return req


def _field_path(loc: tuple) -> list[str]:
    """A pydantic error location without its union-branch labels (`str`, `list[...]`, a part's type tag)."""
    out, skip_tag = [], False
    for x in loc:
        if isinstance(x, str) and ("[" in x or x in ("str", "int", "float", "bool")):
            skip_tag = skip_tag or "tagged-union" in x
            continue
        if skip_tag and isinstance(x, str) and out and out[-1].isdigit():
            skip_tag = False
            continue
        out.append(str(x))
    return out


def sampling_params(req: ChatRequest) -> SamplingParams:
    """The engine's settings for a request (OpenAI defaults: temperature 1, top_p 1)."""
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    max_new = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    try:
        return SamplingParams(max_new_tokens=max_new,
                              temperature=1.0 if req.temperature is None else req.temperature,
                              top_p=1.0 if req.top_p is None else req.top_p, top_k=max(req.top_k or 0, 0),
                              seed=req.seed, stop=stops, ignore_eos=req.ignore_eos, n=req.n,
                              logprobs=req.logprobs, top_logprobs=req.top_logprobs or 0)
    except ValueError as e:
        raise APIError(400, str(e), code="invalid_value") from None


@dataclass
class ImagePolicy:
    max_images: int = 8
    max_image_pixels: int = 40_000_000
    max_image_bytes: int = 20 * 2**20
    allow_remote: bool = False
    allow_local_files: bool = False
    remote_timeout: float = 10.0


def conversation(req: ChatRequest, policy: ImagePolicy) -> tuple[list[dict], list[Image.Image], str | None]:
    """Messages -> (processor messages with `<image>` placeholders, decoded images in order, system prompt)."""
    n_images = sum(isinstance(p, ImagePart) for m in req.messages if isinstance(m.content, list) for p in m.content)
    if n_images > policy.max_images:
        raise APIError(400, f"too many images: {n_images} > {policy.max_images} per request", param="messages",
                       code="too_many_images")
    messages, images, system = [], [], None
    for i, m in enumerate(req.messages):
        parts = [TextPart(type="text", text=m.content)] if isinstance(m.content, str) else m.content
        pieces = []
        for j, p in enumerate(parts):
            where = f"messages.{i}.content" + (f".{j}" if isinstance(m.content, list) else "")
            if isinstance(p, TextPart):
                if IMAGE_PLACEHOLDER in p.text or VIDEO_PLACEHOLDER in p.text:
                    raise APIError(400, f"text may not contain {IMAGE_PLACEHOLDER!r} or {VIDEO_PLACEHOLDER!r}; "
                                   "send images as image_url parts", param=where, code="invalid_value")
                pieces.append(p.text)
            else:
                if m.role != "user":
                    raise APIError(400, f"images are only allowed in user messages (got one in a {m.role} message)",
                                   param=where, code="invalid_value")
                images.append(load_part(p.image_url.url, policy, where))
                pieces.append(IMAGE_PLACEHOLDER)
        text = "\n".join(pieces)
        if m.role in ("system", "developer"):
            if i != 0:
                raise APIError(400, "a system message must come first", param=f"messages.{i}.role",
                               code="invalid_value")
            system = text
        else:
            messages.append({"role": m.role, "content": text})
    if not messages or messages[-1]["role"] != "user":
        raise APIError(400, "the last message must be from the user", param="messages", code="invalid_value")
    return messages, images, system


def load_part(url: str, policy: ImagePolicy, param: str) -> Image.Image:
    """An image_url part -> a decoded RGB image (within the pixel limit), or an APIError."""
    if url.startswith("data:"):
        m = _DATA_URI.fullmatch(url)
        if m is None:
            raise APIError(400, "image data URIs must be data:image/(png|jpeg|webp|gif);base64,...", param=param,
                           code="invalid_image")
        try:
            data = base64.b64decode(m.group(2).strip(), validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, "the image data URI is not valid base64", param=param, code="invalid_image") from None
    elif url.startswith(("http://", "https://")):
        if not policy.allow_remote:
            raise APIError(400, "remote image URLs are disabled on this server (start it with "
                           "--allow-remote-images); send a data URI", param=param, code="remote_images_disabled")
        data = _fetch(url, policy, param)
    else:
        if not policy.allow_local_files:
            raise APIError(400, "local image files are disabled on this server (start it with --allow-local-files); "
                           "send a data URI", param=param, code="local_files_disabled")
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file://") else url)
        if not path.is_file():
            raise APIError(400, f"no such image file: {path}", param=param, code="invalid_image")
        if path.stat().st_size > policy.max_image_bytes:
            raise APIError(400, f"image file over {policy.max_image_bytes} bytes", param=param, code="invalid_image")
        data = path.read_bytes()
    return decode_image(data, policy, param)


def decode_image(data: bytes, policy: ImagePolicy, param: str) -> Image.Image:
    if len(data) > policy.max_image_bytes:
        raise APIError(400, f"image over {policy.max_image_bytes} bytes", param=param, code="invalid_image")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            fmt = probe.format
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise APIError(400, "the image data is not a PNG, JPEG, WebP or GIF image", param=param,
                       code="invalid_image") from None
    if fmt not in IMAGE_FORMATS:
        raise APIError(400, f"unsupported image format {fmt}; use PNG, JPEG, WebP or GIF", param=param,
                       code="invalid_image")
    try:
        return load_image(data, policy.max_image_pixels)
    except ImageError as e:
        raise APIError(400, f"unusable image: {e}", param=param, code="invalid_image") from None


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) URLs only (urllib would also follow ftp://)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not newurl.startswith(("http://", "https://")):
            raise urllib.error.URLError(f"refused a redirect to {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch(url: str, policy: ImagePolicy, param: str) -> bytes:
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    try:
        with opener.open(url, timeout=policy.remote_timeout) as r:  # http(s) only, and only when enabled
            data = r.read(policy.max_image_bytes + 1)
    except (OSError, ValueError) as e:
        raise APIError(400, f"could not fetch the image: {e}", param=param, code="invalid_image") from None
    return data
