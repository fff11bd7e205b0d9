"""OpenAI-compatible HTTP API + the web chat page, on the standard library's ThreadingHTTPServer.

Endpoints:
  POST /v1/chat/completions   messages with `text` and `image_url` (data: base64) parts;
                              `stream` (server-sent events), `max_tokens` /
                              `max_completion_tokens`, `temperature`, `top_p`, `top_k` (extension),
                              `stop`, `seed`, `stream_options.include_usage`
  GET  /v1/models, /v1/models/{id}
  GET  /health                liveness (no API key needed)
  GET  /stats                 batching statistics (batch sizes served, queue, compilations)
  GET  /                      the web chat page (llava_jax/serve/web/index.html)

Every error is an OpenAI-style JSON body `{"error": {"message", "type", "param", "code"}}` with
a 4xx status for anything the client sent (bad JSON, types, base64, images, unknown model,
too many tokens, too many requests), so a bad request can never take the server down. Requests
go through `BatchScheduler`, which batches those that arrive together.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import hmac
import json
import logging
import math
import queue
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from llava_jax.serve.engine import SamplingParams
from llava_jax.serve.generator import ChatGenerator, Completion, RequestError, decode_image
from llava_jax.serve.scheduler import BatchScheduler, QueueFull

log = logging.getLogger(__name__)
WEB_DIR = Path(__file__).resolve().parent / "web"


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


# ---------------------------------------------------------------------------- validation
def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def _bad(msg, param=None, code="invalid_value", status=400):
    raise RequestError(msg, param, code, status)


def _data_url_bytes(url: str, param: str, limits: Limits) -> bytes:
    if not url.startswith("data:"):
        _bad("only data: URLs are supported for images (e.g. data:image/png;base64,...); the server "
             "does not fetch remote URLs", param, "unsupported_image_url")
    head, sep, data = url.partition(",")
    if not sep:
        _bad("malformed data: URL (no comma)", param, "invalid_image_url")
    if not head.endswith(";base64"):
        _bad("image data: URLs must be base64 encoded (data:<type>;base64,...)", param, "invalid_image_url")
    mime = head[5:-7]
    if mime and not mime.startswith("image/") and mime != "application/octet-stream":
        _bad(f"data: URL media type {mime!r} is not an image type", param, "invalid_image_url")
    data = "".join(data.split())  # tolerate line breaks
    if len(data) * 3 // 4 > limits.max_image_bytes:
        _bad(f"image is about {len(data) * 3 // 4} bytes; the limit is {limits.max_image_bytes}", param,
             "image_too_large", 413)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        _bad("image data is not valid base64", param, "invalid_base64")


def parse_messages(raw, limits: Limits) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        _bad("'messages' must be a non-empty array", "messages", "invalid_type")
    if len(raw) > limits.max_messages:
        _bad(f"{len(raw)} messages; the limit is {limits.max_messages}", "messages")
    out, n_images = [], 0
    for i, m in enumerate(raw):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            _bad(f"{p} must be an object", p, "invalid_type")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            _bad(f"{p}.role must be one of system, developer, user, assistant; got {role!r}", f"{p}.role")
        content = m.get("content")
        parts = []
        if isinstance(content, str):
            parts.append({"type": "text", "text": content})
        elif isinstance(content, list):
            if not content:
                _bad(f"{p}.content must not be empty", f"{p}.content")
            for j, part in enumerate(content):
                pp = f"{p}.content[{j}]"
                if not isinstance(part, dict):
                    _bad(f"{pp} must be an object", pp, "invalid_type")
                kind = part.get("type")
                if kind == "text":
                    if not isinstance(part.get("text"), str):
                        _bad(f"{pp}.text must be a string", f"{pp}.text", "invalid_type")
                    parts.append({"type": "text", "text": part["text"]})
                elif kind == "image_url":
                    iu = part.get("image_url")
                    url = iu.get("url") if isinstance(iu, dict) else iu
                    if not isinstance(url, str):
                        _bad(f"{pp}.image_url.url must be a string", f"{pp}.image_url", "invalid_type")
                    if role != "user":
                        _bad(f"{pp}: images are only allowed in user messages", pp)
                    n_images += 1
                    if n_images > limits.max_images:
                        _bad(f"more than {limits.max_images} images in one request", pp, "too_many_images")
                    data = _data_url_bytes(url, f"{pp}.image_url", limits)
                    img = decode_image(data, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels,
                                       max_side=limits.max_image_side, max_aspect=limits.max_image_aspect,
                                       param=f"{pp}.image_url")
                    parts.append({"type": "image", "image": img})
                else:
                    _bad(f"{pp}.type must be 'text' or 'image_url', got {kind!r}", f"{pp}.type")
        else:
            _bad(f"{p}.content must be a string or an array of content parts", f"{p}.content", "invalid_type")
        if not any(x["type"] == "image" or x["text"].strip() for x in parts):
            _bad(f"{p}.content is empty", f"{p}.content")
        out.append({"role": role, "content": parts})
    return out


def parse_sampling(body: dict, limits: Limits) -> tuple[SamplingParams | None, list[str]]:
    """SamplingParams (max_new_tokens None-able: resolved against the prompt later) and stops."""
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    if mt is not None:
        if not _is_int(mt):
            _bad("max_tokens must be an integer", "max_tokens", "invalid_type")
        if mt < 1:
            _bad("max_tokens must be >= 1", "max_tokens")
        if mt > limits.max_tokens:
            _bad(f"max_tokens is {mt}; this server allows at most {limits.max_tokens}", "max_tokens",
                 "max_tokens_exceeded")
    t = body.get("temperature")
    if t is not None and (not _is_num(t) or not 0 <= t <= 2):
        _bad("temperature must be a number between 0 and 2", "temperature")
    top_p = body.get("top_p")
    if top_p is not None and (not _is_num(top_p) or not 0 <= top_p <= 1):
        _bad("top_p must be a number between 0 and 1", "top_p")
    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        _bad("top_k must be a non-negative integer", "top_k")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        _bad("seed must be an integer", "seed", "invalid_type")
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        _bad("stop must be a string or an array of strings", "stop", "invalid_type")
    if len(stops) > limits.max_stop:
        _bad(f"at most {limits.max_stop} stop sequences", "stop")
    if any(len(s) > limits.max_stop_chars for s in stops):
        _bad(f"stop sequences are limited to {limits.max_stop_chars} characters", "stop")
    params = SamplingParams(
        max_new_tokens=-1 if mt is None else int(mt),
        temperature=1.0 if t is None else float(t),  # OpenAI's default temperature is 1
        top_k=0 if top_k is None else int(top_k),
        top_p=1.0 if top_p is None else float(top_p),
        seed=(int(seed) if seed is not None else int(uuid.uuid4().int % 2**32)) % 2**32,
    )
    return params, [s for s in stops if s]


def parse_request(body: Any, limits: Limits, model_names: list[str]) -> dict:
    if not isinstance(body, dict):
        _bad("the request body must be a JSON object", None, "invalid_type")
    model = body.get("model")
    if not isinstance(model, str):
        _bad("'model' must be a string (see GET /v1/models)", "model", "invalid_type")
    if model not in model_names:
        _bad(f"the model {model!r} does not exist; this server serves {model_names}", "model",
             "model_not_found", 404)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        _bad("stream must be a boolean", "stream", "invalid_type")
    so = body.get("stream_options")
    if so is not None and (not isinstance(so, dict) or not isinstance(so.get("include_usage", False), bool)):
        _bad("stream_options must be an object like {\"include_usage\": true}", "stream_options", "invalid_type")
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        _bad("only n=1 is supported", "n")
    if body.get("logprobs") not in (None, False):
        _bad("logprobs are not supported", "logprobs")
    if body.get("tools"):
        _bad("tools are not supported", "tools")
    params, stops = parse_sampling(body, limits)
    messages = parse_messages(body.get("messages"), limits)
    return {"model": model, "stream": stream, "include_usage": bool((so or {}).get("include_usage")),
            "params": params, "stop": stops, "messages": messages}


def error_body(message: str, etype: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": etype, "param": param, "code": code}}


# ---------------------------------------------------------------------------- the app
class App:
    """Everything the request handlers share: generator, scheduler, limits, API key."""

    def __init__(self, generator: ChatGenerator, *, limits: Limits | None = None, api_key: str | None = None,
                 max_batch: int = 8, window_s: float = 0.01, max_pending: int = 32, model_name: str | None = None,
                 continuous: bool = True, reserve_new_tokens: int | None = None):
        self.generator = generator
        self.limits = limits or Limits()
        self.api_key = api_key or None
        self.model_name = model_name or generator.name
        self.scheduler = BatchScheduler(generator, max_batch=max_batch, window_s=window_s, max_pending=max_pending,
                                        continuous=continuous, reserve_new_tokens=reserve_new_tokens)
        self.created = int(time.time())
        self._preparing = threading.BoundedSemaphore(4)
        lim = self.limits.max_prompt_tokens
        self.max_prompt_tokens = generator.context_length - 1 if lim is None else min(lim, generator.context_length - 1)

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "llava-jax"}

    def prepare(self, body) -> tuple[dict, Completion]:
        with self._preparing:  # bounds the memory of images being decoded at once
            req = parse_request(body, self.limits, [self.model_name])
            enc = self.generator.encode(req["messages"])
        n = len(enc.ids)
        ctx = self.generator.context_length
        if n > self.max_prompt_tokens:
            _bad(f"the prompt is {n} tokens (images count {self.generator.cfg.num_image_tokens} each); "
                 f"this server accepts at most {self.max_prompt_tokens}", "messages", "context_length_exceeded")
        params = req["params"]
        room = ctx - n
        if params.max_new_tokens == -1:
            params = dataclasses.replace(params, max_new_tokens=max(1, min(self.limits.default_max_tokens, room)))
        elif n + params.max_new_tokens > ctx:
            _bad(f"this model's context length is {ctx} tokens; the prompt is {n} tokens and max_tokens is "
                 f"{params.max_new_tokens}: lower max_tokens to at most {room}", "max_tokens",
                 "context_length_exceeded")
        return req, Completion(enc, params, req["stop"])


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "llava-jax"
    timeout = 300  # seconds a client may stall a socket read/write

    @property
    def app(self) -> App:
        return self.server.app  # type: ignore[attr-defined]

    def log_message(self, fmt, *args):  # through logging, not stderr
        log.info("%s " + fmt, self.address_string(), *args)

    # ------------------------------------------------------------------ responses
    def _send_json(self, status: int, obj, headers: dict | None = None):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, message: str, etype=None, param=None, code=None, headers=None):
        if etype is None:
            etype = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_exceeded",
                     413: "invalid_request_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")
        self._send_json(status, error_body(message, etype, param, code), headers)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (malformed request line, headers, ...) as JSON too."""
        if code == 501:  # unknown method
            code = 405
        self.close_connection = True
        try:
            self._error(code, message or explain or "bad request")
        except Exception:  # noqa: BLE001
            pass

    def _authorized(self) -> bool:
        key = self.app.api_key
        if key is None:
            return True
        got = self.headers.get("Authorization", "")
        ok = got.startswith("Bearer ") and hmac.compare_digest(got[7:].strip().encode(), key.encode())
        if not ok:
            self._error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        return ok

    # ------------------------------------------------------------------ routes
    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html", "/chat"):
            return self._static("index.html", "text/html; charset=utf-8")
        if path in ("/health", "/healthz", "/v1/health"):
            return self._send_json(200, {"status": "ok", "model": self.app.model_name})
        if path == "/favicon.ico":
            self.send_response(204)
            self.send_header("Content-Length", "0")
            return self.end_headers()
        if not self._authorized():
            return
        if path == "/v1/models":
            return self._send_json(200, self.app.models())
        if path.startswith("/v1/models/"):
            name = path[len("/v1/models/"):]
            if name == self.app.model_name:
                return self._send_json(200, self.app.model_card())
            return self._error(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        if path in ("/stats", "/v1/stats"):
            return self._send_json(200, self.app.scheduler.stats())
        self._error(404, f"no route for GET {path}", code="not_found")

    do_HEAD = do_GET

    def _static(self, name, ctype):
        data = (WEB_DIR / name).read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _method_not_allowed(self):
        self.close_connection = self.headers.get("Content-Length") not in (None, "0")
        self._error(405, f"method {self.command} not allowed on {self.path.split('?', 1)[0]}",
                    code="method_not_allowed", headers={"Allow": "GET, POST"})

    do_PUT = do_DELETE = do_PATCH = _method_not_allowed

    def do_OPTIONS(self):
        self.send_response(204)
        self.send_header("Allow", "GET, POST, OPTIONS")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _read_body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            self._error(411, "chunked request bodies are not supported; send Content-Length", code="length_required")
            return None
        cl = self.headers.get("Content-Length")
        try:
            n = int(cl) if cl is not None else 0
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            self._error(400, f"bad Content-Length {cl!r}", code="invalid_content_length")
            return None
        if n > self.app.limits.max_body_bytes:
            self.close_connection = True
            self._error(413, f"request body is {n} bytes; the limit is {self.app.limits.max_body_bytes}",
                        code="request_too_large")
            return None
        return self.rfile.read(n) if n else b""

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        body = self._read_body()
        if body is None:
            return
        if path not in ("/v1/chat/completions", "/chat/completions"):
            return self._error(404, f"no route for POST {path}", code="not_found")
        if not self._authorized():
            return
        if self.app.scheduler.full():  # before decoding anything
            return self._error(429, "the server is busy (request queue full); retry later", code="too_many_requests",
                               headers={"Retry-After": "1"})
        try:
            parsed = json.loads(body)
        except RecursionError:
            return self._error(400, "request JSON is nested too deeply", code="invalid_json")
        except ValueError as e:
            return self._error(400, f"request body is not valid JSON: {e}", code="invalid_json")
        try:
            req, comp = self.app.prepare(parsed)
        except RequestError as e:
            return self._error(e.status, str(e), param=e.param, code=e.code)
        except RecursionError:
            return self._error(400, "request is nested too deeply", code="invalid_request")
        except Exception as e:  # noqa: BLE001 - a bug, not the client's fault: say so, keep serving
            log.exception("could not prepare a request")
            return self._error(500, f"internal error while reading the request: {type(e).__name__}: {e}")
        events: queue.Queue = queue.Queue()
        comp.on_delta = lambda text: events.put(("delta", text))
        comp.on_done = lambda c: events.put(("done", None))
        try:
            self.app.scheduler.submit(comp)
        except QueueFull as e:
            return self._error(429, str(e), code="too_many_requests", headers={"Retry-After": "1"})
        rid = "chatcmpl-" + uuid.uuid4().hex[:24]
        created = int(time.time())
        try:
            if req["stream"]:
                self._stream(rid, created, comp, events, req["include_usage"])
            else:
                while events.get()[0] != "done":
                    pass
                self._complete(rid, created, comp)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            comp.cancelled = True
            self.close_connection = True

    def _usage(self, comp: Completion) -> dict:
        return {"prompt_tokens": comp.prompt_tokens, "completion_tokens": comp.completion_tokens,
                "total_tokens": comp.prompt_tokens + comp.completion_tokens}

    def _complete(self, rid, created, comp: Completion):
        if comp.error:
            return self._error(500, f"generation failed: {comp.error}", etype="server_error")
        self._send_json(200, {
            "id": rid, "object": "chat.completion", "created": created, "model": self.app.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": comp.text},
                         "finish_reason": comp.finish_reason, "logprobs": None}],
            "usage": self._usage(comp),
        })

    def _chunk(self, data: bytes):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _sse(self, obj):
        self._chunk(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")

    def _stream(self, rid, created, comp: Completion, events: queue.Queue, include_usage: bool):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.app.model_name}

        def choice(delta, finish=None):
            return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

        self._sse(choice({"role": "assistant", "content": ""}))
        while True:
            kind, text = events.get()
            if kind == "done":
                break
            self._sse(choice({"content": text}))
        if comp.error:
            self._sse(error_body(f"generation failed: {comp.error}", "server_error"))
        else:
            self._sse(choice({}, comp.finish_reason))
            if include_usage:
                self._sse({**base, "choices": [], "usage": self._usage(comp)})
        self._sse(b"[DONE]")
        self._chunk(b"")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, app: App):
        self.app = app
        super().__init__(addr, Handler)

    def server_close(self):
        super().server_close()
        self.app.scheduler.close()


def make_server(generator: ChatGenerator, host: str = "127.0.0.1", port: int = 8000, **app_kw) -> Server:
    return Server((host, port), App(generator, **app_kw))


def serve_in_thread(server: Server) -> threading.Thread:
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    return t
