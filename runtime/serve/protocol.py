"""The OpenAI chat-completions request, checked field by field, and the responses built from a Result.

Every refusal is an `ApiError`: an HTTP status and OpenAI's error object
`{"error": {"message", "type", "param", "code"}}` with a one-line message. Nothing here imports the ASGI stack.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from contract.errors import UserError
from runtime.preprocess import load_image_bytes

MAX_STOP = 4  # OpenAI's limit on `stop` sequences
MAX_STOP_CHARS = 256  # one stop sequence's length


class ApiError(Exception):
    """A request the server refuses: HTTP `status` and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, " ".join(message.split()), param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def from_user_error(exc: UserError, param: str | None = None) -> ApiError:
    """An InputError / ManifestError raised by the runtime for this request -> 400 with its one line."""
    return ApiError(400, str(exc), param=param, code="invalid_input")


@dataclass(frozen=True)
class Sampling:
    """Options that must be equal for requests to share one pipeline call (see batcher.Batcher)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class ChatRequest:
    prompt: str  # the user's text parts, joined by newlines
    image: Image.Image  # decoded, RGB
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with `usage`
    id: str = field(default_factory=lambda: "chatcmpl-" + uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))


def parse_chat(body: object, *, model: str, max_tokens_limit: int, default_max_tokens: int,
               max_image_bytes: int, allow_image_dir: Path | None) -> ChatRequest:
    """A decoded JSON body -> ChatRequest, or ApiError naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {_kind(body)}")
    if "model" not in body:
        raise ApiError(400, "missing required field 'model'", param="model", code="missing_field")
    if not isinstance(body["model"], str):
        raise ApiError(400, f"'model' must be a string, got {_kind(body['model'])}", param="model")
    if body["model"] != model:
        raise ApiError(404, f"the model {body['model'][:200]!r} does not exist; this server serves {model!r}",
                       param="model", code="model_not_found")
    if body.get("n", 1) != 1 or isinstance(body.get("n"), bool):
        raise ApiError(400, f"n={body.get('n')!r}: this server returns one choice per request (n=1)", param="n")
    if body.get("logprobs") not in (None, False):
        raise ApiError(400, "logprobs are not supported by this server", param="logprobs")
    prompt, image_url = _messages(body.get("messages"))
    max_tokens = _max_tokens(body, max_tokens_limit, default_max_tokens)
    stream = _typed(body, "stream", bool, False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, f"'stream_options' must be an object, got {_kind(options)}", param="stream_options")
    include_usage = _typed(options or {}, "include_usage", bool, False, param="stream_options.include_usage")
    image = load_request_image(image_url, max_image_bytes, allow_image_dir)
    return ChatRequest(prompt=prompt, image=image, max_tokens=max_tokens, sampling=_sampling(body),
                       stop=_stop(body.get("stop")), stream=stream, include_usage=include_usage)


def _messages(messages: object) -> tuple[str, str]:
    """One user message: its text parts and exactly one image_url part -> (prompt, url)."""
    if messages is None:
        raise ApiError(400, "missing required field 'messages'", param="messages", code="missing_field")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, f"'messages' must be a non-empty list, got {_kind(messages)}", param="messages")
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    if roles != ["user"]:
        raise ApiError(400, f"'messages' has roles {roles[:8]}; this export answers one user message about one "
                       "image (no system or assistant turns)", param="messages")
    content = messages[0].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list) or not parts:
        raise ApiError(400, f"'messages[0].content' must be a string or a non-empty list of parts, got {_kind(content)}",
                       param="messages[0].content")
    texts, urls = [], []
    for index, part in enumerate(parts):
        where = f"messages[0].content[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and isinstance(part.get("image_url"), dict) and isinstance(part["image_url"].get("url"), str):
            urls.append(part["image_url"]["url"])
        elif kind == "image_url" and isinstance(part.get("image_url"), str):
            urls.append(part["image_url"])
        else:
            raise ApiError(400, f"'{where}' must be {{'type': 'text', 'text': str}} or {{'type': 'image_url', "
                           f"'image_url': {{'url': str}}}}, got {_kind(part)} of type {kind!r}", param=where)
    if len(urls) != 1:
        raise ApiError(400, f"the message has {len(urls)} images; this export takes exactly one image per request",
                       param="messages[0].content", code="wrong_image_count")
    return "\n".join(texts), urls[0]


def _max_tokens(body: dict, limit: int, default: int) -> int:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(name)
    if value is None:
        return min(default, limit)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise ApiError(400, f"'{name}'={value!r} must be an integer in 1..{limit} (this export's maximum "
                       "sequence length)", param=name)
    return value


def _sampling(body: dict) -> Sampling:
    """temperature absent or 0: greedy (as python -m runtime); > 0: sampling with it and top_p."""
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ApiError(400, f"'seed'={seed!r} must be an integer in 0..2**63-1", param="seed")
    if top_p is not None and top_p <= 0:
        raise ApiError(400, f"'top_p'={top_p!r} must be > 0 and <= 1", param="top_p")
    if not temperature:
        return Sampling()
    return Sampling(True, float(temperature), 1.0 if top_p is None else float(top_p), seed)


def _number(body: dict, name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ApiError(400, f"'{name}'={value!r} must be a number in {low:g}..{high:g}", param=name)
    return float(value)


def _stop(stop: object) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(
            isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOP} non-empty strings of at most "
                       f"{MAX_STOP_CHARS} characters", param="stop")
    return tuple(stops)


def _typed(body: dict, name: str, kind: type, default, param: str | None = None):
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise ApiError(400, f"'{param or name}' must be a {kind.__name__}, got {_kind(value)}", param=param or name)
    return value


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


# --- images -------------------------------------------------------------------------------------------
def load_request_image(url: str, max_bytes: int, allow_dir: Path | None) -> Image.Image:
    """A data URL (always) or a file under allow_dir (file:// URL or path, only with --allow-image-dir) ->
    decoded RGB image. Remote URLs are never fetched."""
    param = "messages[0].content.image_url"
    if url.startswith("data:"):
        data = _data_url_bytes(url, max_bytes, param)
    elif urlparse(url).scheme in ("", "file"):
        if allow_dir is None:
            raise ApiError(400, "local image paths are refused; send the image as a base64 data URL "
                           "(data:image/jpeg;base64,...) or start the server with --allow-image-dir DIR",
                           param=param, code="image_source_refused")
        data = _allowed_file_bytes(url, allow_dir, max_bytes, param)
    else:
        raise ApiError(400, f"image URLs with scheme {urlparse(url).scheme[:20]!r} are not fetched; send the image as "
                       "a base64 data URL (data:image/jpeg;base64,...)", param=param, code="image_source_refused")
    try:
        return load_image_bytes(data, "the request's image")
    except UserError as exc:
        raise ApiError(400, str(exc), param=param, code="invalid_image") from None


def _data_url_bytes(url: str, max_bytes: int, param: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ApiError(400, "the image data URL must be data:<type>;base64,<data>", param=param, code="invalid_image")
    if len(payload) // 4 * 3 > max_bytes + 2:  # before decoding: never hold more than the limit
        raise ApiError(413, f"the image is larger than this server's limit of {max_bytes} bytes", param=param,
                       code="image_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "the image data URL's payload is not valid base64", param=param, code="invalid_image") from None
    if len(data) > max_bytes:
        raise ApiError(413, f"the image is larger than this server's limit of {max_bytes} bytes", param=param,
                       code="image_too_large")
    return data


def _allowed_file_bytes(url: str, allow_dir: Path, max_bytes: int, param: str) -> bytes:
    """Read a regular file whose real path (symlinks resolved, also after opening) is inside allow_dir."""
    path = Path(unquote(urlparse(url).path) if url.startswith("file:") else url)
    root = Path(allow_dir).resolve()
    refused = ApiError(403, "the image path is outside the directory this server may read (--allow-image-dir)",
                       param=param, code="image_source_refused")
    try:
        real = (root / path).resolve(strict=True)
    except (OSError, RuntimeError):
        raise ApiError(400, "the image path does not exist or cannot be resolved", param=param, code="invalid_image") from None
    if not real.is_relative_to(root):
        raise refused
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        raise ApiError(400, "the image file cannot be opened", param=param, code="invalid_image") from None
    with os.fdopen(fd, "rb") as file:
        # The file actually opened, by its descriptor: a path component swapped for a symlink after resolve() shows here.
        opened = Path(os.path.realpath(f"/proc/self/fd/{fd}")) if Path("/proc/self/fd").is_dir() else real
        if not opened.is_relative_to(root):
            raise refused
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ApiError(400, "the image path is not a regular file", param=param, code="invalid_image")
        data = file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ApiError(413, f"the image is larger than this server's limit of {max_bytes} bytes", param=param,
                       code="image_too_large")
    return data


# --- responses ----------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(request: ChatRequest, model: str, text: str, finish_reason: str, usage_: dict, extras: dict) -> dict:
    return {
        "id": request.id, "object": "chat.completion", "created": request.created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                     "logprobs": None}],
        "usage": usage_,
        "prunevlm": extras,  # OpenAI clients ignore unknown fields (the Python client keeps them in model_extra)
    }


def chunk(request: ChatRequest, model: str, delta: dict, finish_reason: str | None = None, **extra) -> dict:
    return {
        "id": request.id, "object": "chat.completion.chunk", "created": request.created, "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}], **extra,
    }
