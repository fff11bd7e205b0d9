"""The body of a chat completion request -> a validated request, or a `RequestError` (a 4xx with
an OpenAI-style JSON error naming the field) - before anything reaches the tokenizer or the
engine. `Limits` holds the server's per-request limits."""
from __future__ import annotations

import base64
import binascii
import dataclasses
import math
import uuid
from typing import Any

from llava_jax.serve.engine import SamplingParams
from llava_jax.serve.generator import RequestError, decode_image


@dataclasses.dataclass
class Limits:
    max_body_bytes: int = 48 * 2**20
    max_image_bytes: int = 16 * 2**20
    max_image_pixels: int = 36_000_000  # e.g. 6000 x 6000
    max_image_side: int = 8192
    max_image_aspect: float = 20.0
    max_images: int = 4
    max_messages: int = 256
    max_prompt_tokens: int | None = None  # None: the model's context length - 1
    max_tokens: int = 1024  # per request
    default_max_tokens: int = 256
    max_stop: int = 4
    max_stop_chars: int = 256
    # seconds a client may take: to send a request's head (request line and headers: the
    # connection is closed), to send its body (408), and to read a stream it stopped reading
    # (the connection is dropped and the generation cancelled)
    header_timeout_s: float = 30.0
    body_timeout_s: float = 30.0
    send_timeout_s: float = 300.0


# ---------------------------------------------------------------------------- validation
def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    # ints are compared as ints: math.isfinite(10**400) would raise OverflowError
    return _is_int(x) or (isinstance(x, float) and math.isfinite(x))


def reject(msg, param=None, code="invalid_value", status=400):
    raise RequestError(msg, param, code, status)


def _text(s: str, param: str) -> str:
    """A JSON string as text the tokenizer can take: JSON may escape a lone surrogate ("\\ud800"),
    which is no Unicode character and cannot be encoded (the tokenizer would raise)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        reject(f"{param} is not valid Unicode text: it contains a lone surrogate (\\ud800-\\udfff)", param,
               "invalid_string")
    return s


INT32_MAX = 2**31 - 1  # the engine's per-row sampling arrays are int32 (top_k, max_new_tokens)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # OpenAI's seed is an int64; the engine reduces it mod 2**32


def _field(body: dict, name: str, lo, hi, *, integer: bool = False, what: str | None = None):
    """body[name] (None when absent or null) checked to be a number, or an integer, in [lo, hi]:
    every sampling field is checked here, against the engine's type and range, so that no value
    reaches a batch that the engine cannot take (one bad row would fail its whole batch)."""
    x = body.get(name)
    if x is None:
        return None
    kind = "an integer" if integer else "a number"
    if not (_is_int(x) if integer else _is_num(x)):
        reject(f"{name} must be {kind}", name, "invalid_type")
    if not lo <= x <= hi:
        reject(f"{name} must be {kind} between {lo} and {hi}" + (f" ({what})" if what else ""), name)
    return x


def _unsupported(body: dict, name: str, lo, hi, *, integer: bool = False):
    """An OpenAI field this server does not implement: accepted only at its neutral value (0),
    after the same type and range check as OpenAI's, so a request that needs it is refused rather
    than silently answered without it."""
    if _field(body, name, lo, hi, integer=integer):
        reject(f"{name} is not supported by this server (only 0)", name, "unsupported_value")


def _data_url_bytes(url: str, param: str, limits: Limits) -> bytes:
    if not url.startswith("data:"):
        reject("only data: URLs are supported for images (e.g. data:image/png;base64,...); the server "
             "does not fetch remote URLs", param, "unsupported_image_url")
    head, sep, data = url.partition(",")
    if not sep:
        reject("malformed data: URL (no comma)", param, "invalid_image_url")
    if not head.endswith(";base64"):
        reject("image data: URLs must be base64 encoded (data:<type>;base64,...)", param, "invalid_image_url")
    mime = head[5:-7]
    if mime and not mime.startswith("image/") and mime != "application/octet-stream":
        reject(f"data: URL media type {mime!r} is not an image type", param, "invalid_image_url")
    data = "".join(data.split())  # tolerate line breaks
    if len(data) * 3 // 4 > limits.max_image_bytes:
        reject(f"image is about {len(data) * 3 // 4} bytes; the limit is {limits.max_image_bytes}", param,
             "image_too_large", 413)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        reject("image data is not valid base64", param, "invalid_base64")


def parse_messages(raw, limits: Limits, max_chars: int | None = None) -> list[dict]:
    """`max_chars`: more characters of text than any prompt the server accepts can hold (see
    `ChatGenerator.max_text_chars`); refused here, before tokenization, which every request
    waits for under one tokenizer lock."""
    if not isinstance(raw, list) or not raw:
        reject("'messages' must be a non-empty array", "messages", "invalid_type")
    if len(raw) > limits.max_messages:
        reject(f"{len(raw)} messages; the limit is {limits.max_messages}", "messages")
    out, n_images, chars = [], 0, 0

    def text_part(text, param) -> dict:
        nonlocal chars
        chars += len(text)
        if max_chars is not None and chars > max_chars:
            reject(f"the messages hold more than {max_chars} characters of text: longer than any prompt this "
                   "server accepts", "messages", "context_length_exceeded")
        return {"type": "text", "text": _text(text, param)}

    for i, m in enumerate(raw):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            reject(f"{p} must be an object", p, "invalid_type")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            reject(f"{p}.role must be one of system, developer, user, assistant; got {role!r}", f"{p}.role")
        content = m.get("content")
        parts = []
        if isinstance(content, str):
            parts.append(text_part(content, f"{p}.content"))
        elif isinstance(content, list):
            if not content:
                reject(f"{p}.content must not be empty", f"{p}.content")
            for j, part in enumerate(content):
                pp = f"{p}.content[{j}]"
                if not isinstance(part, dict):
                    reject(f"{pp} must be an object", pp, "invalid_type")
                kind = part.get("type")
                if kind == "text":
                    if not isinstance(part.get("text"), str):
                        reject(f"{pp}.text must be a string", f"{pp}.text", "invalid_type")
                    parts.append(text_part(part["text"], f"{pp}.text"))
                elif kind == "image_url":
                    iu = part.get("image_url")
                    url = iu.get("url") if isinstance(iu, dict) else iu
                    if not isinstance(url, str):
                        reject(f"{pp}.image_url.url must be a string", f"{pp}.image_url", "invalid_type")
                    if role != "user":
                        reject(f"{pp}: images are only allowed in user messages", pp)
                    n_images += 1
                    if n_images > limits.max_images:
                        reject(f"more than {limits.max_images} images in one request", pp, "too_many_images")
                    data = _data_url_bytes(url, f"{pp}.image_url", limits)
                    img = decode_image(data, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels,
                                       max_side=limits.max_image_side, max_aspect=limits.max_image_aspect,
                                       param=f"{pp}.image_url")
                    parts.append({"type": "image", "image": img})
                else:
                    reject(f"{pp}.type must be 'text' or 'image_url', got {kind!r}", f"{pp}.type")
        else:
            reject(f"{p}.content must be a string or an array of content parts", f"{p}.content", "invalid_type")
        if not any(x["type"] == "image" or x["text"].strip() for x in parts):
            reject(f"{p}.content is empty", f"{p}.content")
        out.append({"role": role, "content": parts})
    return out


def parse_sampling(body: dict, limits: Limits) -> tuple[SamplingParams | None, list[str]]:
    """SamplingParams (max_new_tokens -1 when not given: resolved against the prompt later) and stops."""
    mt = None
    for name in ("max_tokens", "max_completion_tokens"):  # the newer name wins when both are given
        x = body.get(name)
        if x is None:
            continue
        if not _is_int(x):
            reject(f"{name} must be an integer", name, "invalid_type")
        if x < 1:
            reject(f"{name} must be >= 1", name)
        if x > limits.max_tokens:
            reject(f"{name} is {x}; this server allows at most {limits.max_tokens}", name, "max_tokens_exceeded")
        mt = x
    t = _field(body, "temperature", 0, 2)
    top_p = _field(body, "top_p", 0, 1)
    top_k = _field(body, "top_k", 0, INT32_MAX, integer=True, what="0: off")
    seed = _field(body, "seed", INT64_MIN, INT64_MAX, integer=True)
    _unsupported(body, "presence_penalty", -2, 2)
    _unsupported(body, "frequency_penalty", -2, 2)
    lb = body.get("logit_bias")
    if lb is not None and not isinstance(lb, dict):
        reject("logit_bias must be an object (token id -> bias)", "logit_bias", "invalid_type")
    if lb:
        reject("logit_bias is not supported by this server", "logit_bias", "unsupported_value")
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        reject("stop must be a string or an array of strings", "stop", "invalid_type")
    if len(stops) > limits.max_stop:
        reject(f"at most {limits.max_stop} stop sequences", "stop")
    if any(len(s) > limits.max_stop_chars for s in stops):
        reject(f"stop sequences are limited to {limits.max_stop_chars} characters", "stop")
    stops = [_text(s, "stop") for s in stops]
    params = SamplingParams(
        max_new_tokens=-1 if mt is None else int(mt),
        temperature=1.0 if t is None else float(t),  # OpenAI's default temperature is 1
        top_k=0 if top_k is None else int(top_k),
        top_p=1.0 if top_p is None else float(top_p),
        seed=(int(seed) if seed is not None else int(uuid.uuid4().int % 2**32)) % 2**32,
    )
    return params, [s for s in stops if s]


def parse_request(body: Any, limits: Limits, model_names: list[str], max_chars: int | None = None) -> dict:
    if not isinstance(body, dict):
        reject("the request body must be a JSON object", None, "invalid_type")
    model = body.get("model")
    if not isinstance(model, str):
        reject("'model' must be a string (see GET /v1/models)", "model", "invalid_type")
    if model not in model_names:
        reject(f"the model {model!r} does not exist; this server serves {model_names}", "model",
             "model_not_found", 404)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        reject("stream must be a boolean", "stream", "invalid_type")
    so = body.get("stream_options")
    if so is not None and (not isinstance(so, dict) or not isinstance(so.get("include_usage", False), bool)):
        reject("stream_options must be an object like {\"include_usage\": true}", "stream_options", "invalid_type")
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        reject("only n=1 is supported", "n")
    lp = body.get("logprobs")
    if lp is not None and not isinstance(lp, bool):
        reject("logprobs must be a boolean", "logprobs", "invalid_type")
    if lp:
        reject("logprobs are not supported", "logprobs")
    _unsupported(body, "top_logprobs", 0, 20, integer=True)
    if body.get("tools"):
        reject("tools are not supported", "tools")
    params, stops = parse_sampling(body, limits)
    messages = parse_messages(body.get("messages"), limits, max_chars)
    return {"model": model, "stream": stream, "include_usage": bool((so or {}).get("include_usage")),
            "params": params, "stop": stops, "messages": messages}


def error_body(message: str, etype: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": etype, "param": param, "code": code}}
