"""OpenAI-compatible HTTP API + the web chat page, on the standard library's ThreadingHTTPServer.

Endpoints:
  POST /v1/chat/completions   messages with `text` and `image_url` (data: base64) parts;
                              `stream` (server-sent events), `max_tokens` /
                              `max_completion_tokens`, `temperature`, `top_p`, `top_k` (extension),
                              `stop`, `seed`, `stream_options.include_usage` (checked in
                              `request.py`, against the engine's types and ranges)
  GET  /v1/models, /v1/models/{id}
  GET  /health                liveness (no API key needed)
  GET  /stats                 batching statistics (batch sizes served, queue, compilations)
  GET  /                      the web chat page (llava_jax/serve/web/index.html)

Every error is an OpenAI-style JSON body `{"error": {"message", "type", "param", "code"}}` with
a 4xx status for anything the client sent (bad JSON, types, base64, images, unknown model,
too many tokens, too many requests), so a bad request can never take the server down. Requests
go through `BatchScheduler`, which batches those that arrive together; a failure inside a batch
is a 500 (or a stream's error event, then `[DONE]`) for that batch's requests only, naming the
request id under which the server log has the details.

Cheap checks come first: the Host header (without an API key: `host_allowed`), the route, the
API key, the body's size and JSON content type - all before the body is read - then the queue
(429), then the fields, and text longer than any accepted prompt can hold before tokenization.
A client that hangs up cancels its request.
"""
from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import json
import logging
import queue
import re
import select
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from llava_jax.serve.generator import ChatGenerator, Completion, RequestError
from llava_jax.serve.request import Limits, error_body, parse_request, reject
from llava_jax.serve.scheduler import BatchScheduler, QueueFull

log = logging.getLogger(__name__)
WEB_DIR = Path(__file__).resolve().parent / "web"


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
        self.max_prompt_chars = generator.max_text_chars(self.max_prompt_tokens)

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "llava-jax"}

    def prepare(self, body) -> tuple[dict, Completion]:
        with self._preparing:  # bounds the memory of images being decoded at once
            req = parse_request(body, self.limits, [self.model_name], self.max_prompt_chars)
            enc = self.generator.encode(req["messages"])
        n = len(enc.ids)
        ctx = self.generator.context_length
        if n > self.max_prompt_tokens:
            reject(f"the prompt is {n} tokens (images count {self.generator.cfg.num_image_tokens} each); "
                 f"this server accepts at most {self.max_prompt_tokens}", "messages", "context_length_exceeded")
        params = req["params"]
        room = ctx - n
        if params.max_new_tokens == -1:
            params = dataclasses.replace(params, max_new_tokens=max(1, min(self.limits.default_max_tokens, room)))
        elif n + params.max_new_tokens > ctx:
            reject(f"this model's context length is {ctx} tokens; the prompt is {n} tokens and max_tokens is "
                 f"{params.max_new_tokens}: lower max_tokens to at most {room}", "max_tokens",
                 "context_length_exceeded")
        return req, Completion(enc, params, req["stop"])


_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\[\]:]+)(?::(\d{1,5}))?")


def host_allowed(host: str | None, bound_host: str, port: int) -> bool:
    """Whether a Host header names this server, checked when it has no API key. DNS rebinding: a
    web page whose owner points its name at 127.0.0.1 is then same-origin with a local server and
    can read its answers, and its requests carry that name as Host. An IP address, `localhost` or
    the name the server was bound to, with its port, can only come from a client that addressed
    this server itself."""
    if host is None:
        return True  # every browser sends Host: a client without one is no web page
    m = _HOST.fullmatch(host.strip())
    if not m or int(m.group(2) or 80) != port:
        return False
    name = m.group(1).strip("[]").lower()
    if name in ("localhost", bound_host.lower()):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _generation_failed(rid: str, comp: Completion) -> str:
    """The client's error message for a request whose batch failed: the exception (which may name
    paths or internals) goes to the log only, under the request's id."""
    log.error("request %s failed: %s", rid, comp.error)
    return f"generation failed (internal error; the server log has the details under {rid})"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "llava-jax"
    timeout = 300  # seconds a client may stall a socket read/write

    @property
    def app(self) -> App:
        return self.server.app  # type: ignore[attr-defined]

    def log_message(self, fmt, *args):  # through logging, not stderr
        log.info("%s " + fmt, self.address_string(), *args)

    def parse_request(self) -> bool:
        """http.server's request line and headers, then, for every route of a server without an
        API key, the Host check (`host_allowed`)."""
        if not super().parse_request():
            return False
        host = self.headers.get("Host")
        if self.app.api_key is None and not host_allowed(host, self.server.bound_host, self.server.server_address[1]):
            self.close_connection = True
            self._error(403, f"Host {host!r} does not name this server: without an API key it answers only requests "
                        "addressed to an IP address, localhost or its --host name, with its port (a protection "
                        "against DNS rebinding)", code="host_not_allowed")
            return False
        return True

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
            etype = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error", 429: "rate_limit_exceeded",
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
            self._body_unread()
            self._error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        return ok

    def _body_unread(self):
        """Answering before reading the body (refusals are decided on the headers, so a client
        cannot make the server read, or wait for, a large body first): close the connection
        after the answer, or the unread body would be taken for the next request."""
        if self.headers.get("Content-Length") not in (None, "0") or "Transfer-Encoding" in self.headers:
            self.close_connection = True

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
        self._body_unread()
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
        ctype = self.headers.get("Content-Type", "")
        if ctype.split(";", 1)[0].strip().lower() != "application/json":
            # a page on another site may POST a form or text/plain here without the browser asking
            # first (CORS preflight); application/json it may not
            self._body_unread()
            self._error(415, f"the request body must be JSON sent with Content-Type: application/json (got "
                        f"{ctype or 'none'!r})", code="unsupported_media_type")
            return None
        return self.rfile.read(n) if n else b""

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        if path not in ("/v1/chat/completions", "/chat/completions"):
            self._body_unread()
            return self._error(404, f"no route for POST {path}", code="not_found")
        if not self._authorized():
            return
        body = self._read_body()
        if body is None:
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
        except Exception:  # noqa: BLE001 - a bug, not the client's fault: say so (details in the log only), keep serving
            log.exception("could not prepare a request")
            return self._error(500, "internal error while reading the request (the server log has the details)")
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
                while (event := self._next_event(events, comp)) and event[0] != "done":
                    pass
                if event:
                    self._complete(rid, created, comp)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            comp.cancelled = True
            self.close_connection = True

    def _next_event(self, events: queue.Queue, comp: Completion):
        """The next event of `comp`, or None when its client has hung up meanwhile (`comp` is then
        cancelled, which frees its batch row and queue slot)."""
        while True:
            try:
                return events.get(timeout=0.2)
            except queue.Empty:
                if self._client_gone():
                    comp.cancelled = True
                    self.close_connection = True
                    return None

    def _client_gone(self) -> bool:
        """Whether the client closed the connection. Until a non-streaming answer (or a stream's
        next piece) is written, no write can fail, so ask the socket: readable with nothing to
        read is its end. (A client that half-closes after its request counts as gone.)"""
        try:
            if not select.select([self.connection], [], [], 0)[0]:
                return False
            return not self.connection.recv(1, socket.MSG_PEEK)
        except (OSError, ValueError):
            return True

    def _usage(self, comp: Completion) -> dict:
        return {"prompt_tokens": comp.prompt_tokens, "completion_tokens": comp.completion_tokens,
                "total_tokens": comp.prompt_tokens + comp.completion_tokens}

    def _complete(self, rid, created, comp: Completion):
        if comp.error:
            return self._error(500, _generation_failed(rid, comp), etype="server_error")
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
            event = self._next_event(events, comp)
            if event is None:
                return
            kind, text = event
            if kind == "done":
                break
            self._sse(choice({"content": text}))
        if comp.error:
            self._sse(error_body(_generation_failed(rid, comp), "server_error"))
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
        self.bound_host = addr[0]  # as given (server_address holds the address it resolved to)
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
