"""OpenAI-compatible HTTP API + the web chat page, served by uvicorn (h11) and Starlette.

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
too many tokens, too many requests, malformed HTTP), so a bad request can never take the server
down. Requests go through `BatchScheduler`, which batches those that arrive together; a failure
inside a batch is a 500 (or a stream's error event, then `[DONE]`) for that batch's requests
only, naming the request id under which the server log has the details.

Cheap checks come first: the Host header (without an API key: `host_allowed`), the route, the
API key, the body's framing, size and JSON content type - all before the body is read - then
the queue (429), then the fields, and text longer than any accepted prompt can hold before
tokenization. Refusals decided before the body is read close the connection, so an unread body
is never taken for the next request (nor read at all).

Transport: uvicorn's HTTP/1.1 server (h11) runs one asyncio event loop; Starlette routes. The
loop never blocks: JSON decoding and `App.prepare` (image decoding, tokenization) run in worker
threads, and the scheduler's callbacks (engine thread) reach a request's coroutine through
`loop.call_soon_threadsafe`. Limits:
  * `backlog`: the listening socket's accept queue;
  * `max_connections` (uvicorn's `limit_concurrency`): beyond that many open connections (or
    requests in progress), uvicorn itself answers 503 "Service Unavailable" (plain text, not
    JSON) and closes the connection;
  * `max_pending` (the scheduler): queued + running requests beyond it get 429, `Retry-After: 1`;
  * `keep_alive_s`: an idle keep-alive connection is closed after that long;
  * `Limits.header_timeout_s`: a connection whose request line and headers are not complete by
    then is closed; `Limits.body_timeout_s`: a body not received by then is a 408;
    `Limits.send_timeout_s`: a client that stops reading its reply for that long is dropped;
  * `shutdown()` (or SIGINT/SIGTERM under `python -m llava_jax.serve`) is graceful: the socket
    stops accepting, idle connections close, requests in progress finish (up to
    `graceful_shutdown_s`, then they are cancelled), then the scheduler stops.
A client that hangs up cancels its request (streaming or not): its batch row and queue slot
are freed at the next decode step. uvicorn's access log is off unless asked for (`access_log`).
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import ipaddress
import json
import logging
import re
import threading
import time
import uuid
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from llava_jax.serve.generator import ChatGenerator, Completion, RequestError
from llava_jax.serve.request import Limits, error_body, parse_request, reject
from llava_jax.serve.scheduler import BatchScheduler, QueueFull
from llava_jax.serve.transport import (
    DEFAULT_BACKLOG,
    DEFAULT_GRACEFUL_SHUTDOWN_S,
    DEFAULT_KEEP_ALIVE_S,
    DEFAULT_MAX_CONNECTIONS,
    Server,
)

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
            reject(f"the prompt is {n} tokens (images count {self.generator.image_tokens_text} each); "
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


# ---------------------------------------------------------------------------- responses
_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_exceeded"}


def json_response(status: int, obj, headers: dict | None = None, close: bool = False) -> Response:
    """`obj` as JSON; `close`: end the connection after it (a request whose body was not read)."""
    headers = dict(headers or {})
    if close:
        headers["Connection"] = "close"
    return Response(json.dumps(obj).encode(), status, headers=headers, media_type="application/json")


def error_response(status: int, message: str, etype: str | None = None, param=None, code=None,
                   headers: dict | None = None, close: bool = False) -> Response:
    if etype is None:
        etype = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return json_response(status, error_body(message, etype, param, code), headers, close)


def _body_unread(request: Request) -> bool:
    """Whether answering now leaves a body unread: refusals are decided on the headers, so a
    client cannot make the server read, or wait for, a large body first; the connection is then
    closed after the answer, or the unread body would be taken for the next request."""
    h = request.headers
    return h.get("content-length") not in (None, "0") or "transfer-encoding" in h


def _usage(comp: Completion) -> dict:
    return {"prompt_tokens": comp.prompt_tokens, "completion_tokens": comp.completion_tokens,
            "total_tokens": comp.prompt_tokens + comp.completion_tokens}


# ---------------------------------------------------------------------------- the ASGI app
class _HostCheck:
    """ASGI middleware in front of every route: without an API key, a request whose Host header
    does not name this server (`host_allowed`) is refused with 403 before anything else."""

    def __init__(self, inner, app: App, bound_host: str, port: int):
        self.inner, self.app, self.bound_host, self.port = inner, app, bound_host, port

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.app.api_key is None:
            host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)
            if not host_allowed(host, self.bound_host, self.port):
                resp = error_response(
                    403, f"Host {host!r} does not name this server: without an API key it answers only requests "
                    "addressed to an IP address, localhost or its --host name, with its port (a protection "
                    "against DNS rebinding)", code="host_not_allowed", close=True)
                return await resp(scope, receive, send)
        await self.inner(scope, receive, send)


class _AnyMethod:
    """An endpoint for every method: Starlette gives a plain function route GET (and HEAD) only,
    and answers other methods with its own 405; an ASGI object it routes every method to."""

    def __init__(self, handler):
        self.handler = handler

    async def __call__(self, scope, receive, send):
        response = await self.handler(Request(scope, receive))
        await response(scope, receive, send)


class _Api:
    """The routes. Every route and method that has no handler of its own ends in `fallback`, so
    the answers for unknown routes and methods (404, 405, OPTIONS) are this server's, in JSON."""

    CHAT_PATHS = ("/v1/chat/completions", "/chat/completions")

    def __init__(self, app: App, bound_host: str, port: int):
        self.app = app
        get = ["GET"]  # Starlette adds HEAD
        routes = [Route(p, self.page, methods=get) for p in ("/", "/index.html", "/chat")]
        routes += [Route(p, self.health, methods=get) for p in ("/health", "/healthz", "/v1/health")]
        routes += [Route("/favicon.ico", self.favicon, methods=get),
                   Route("/v1/models", self.models, methods=get),
                   Route("/v1/models/{name:path}", self.model, methods=get)]
        routes += [Route(p, self.stats, methods=get) for p in ("/stats", "/v1/stats")]
        routes += [Route(p, self.chat, methods=["POST"]) for p in self.CHAT_PATHS]
        routes.append(Route("/{path:path}", _AnyMethod(self.fallback)))
        starlette = Starlette(routes=routes, exception_handlers={HTTPException: self.http_exception,
                                                                 Exception: self.internal_error})
        self.asgi = _HostCheck(starlette, app, bound_host, port)

    # ------------------------------------------------------------------ errors
    async def http_exception(self, request: Request, exc: HTTPException) -> Response:
        """Starlette's own errors (e.g. a route matched with a method it does not take) in JSON."""
        if exc.status_code < 400:
            return Response(status_code=exc.status_code, headers=exc.headers)
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers, close=_body_unread(request))

    async def internal_error(self, request: Request, exc: Exception) -> Response:
        # Starlette logs nothing itself; uvicorn logs the exception it re-raises
        return error_response(500, "internal error (the server log has the details)", close=True)

    def unauthorized(self, request: Request) -> Response | None:
        key = self.app.api_key
        if key is None:
            return None
        got = request.headers.get("authorization", "")
        if got.startswith("Bearer ") and hmac.compare_digest(got[7:].strip().encode(), key.encode()):
            return None
        return error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                              code="invalid_api_key", close=_body_unread(request))

    # ------------------------------------------------------------------ small routes
    async def page(self, request: Request) -> Response:
        data = (WEB_DIR / "index.html").read_bytes()
        return Response(data, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})

    async def favicon(self, request: Request) -> Response:
        return Response(status_code=204)

    async def health(self, request: Request) -> Response:
        return json_response(200, {"status": "ok", "model": self.app.model_name})

    async def models(self, request: Request) -> Response:
        return self.unauthorized(request) or json_response(200, self.app.models())

    async def model(self, request: Request) -> Response:
        if denied := self.unauthorized(request):
            return denied
        name = request.path_params["name"]
        if name == self.app.model_name:
            return json_response(200, self.app.model_card())
        return error_response(404, f"the model {name!r} does not exist", param="model", code="model_not_found")

    async def stats(self, request: Request) -> Response:
        return self.unauthorized(request) or json_response(200, self.app.scheduler.stats())

    async def fallback(self, request: Request) -> Response:
        method, path = request.method, request.url.path
        if method == "OPTIONS":
            return Response(status_code=204, headers={"Allow": "GET, POST, OPTIONS"})
        if method in ("GET", "HEAD"):
            return self.unauthorized(request) or error_response(404, f"no route for GET {path}", code="not_found")
        if method == "POST":
            return error_response(404, f"no route for POST {path}", code="not_found", close=_body_unread(request))
        return error_response(405, f"method {method} not allowed on {path}", code="method_not_allowed",
                              headers={"Allow": "GET, POST"}, close=_body_unread(request))

    # ------------------------------------------------------------------ chat completions
    async def chat(self, request: Request) -> Response:
        if denied := self.unauthorized(request):
            return denied
        app, h = self.app, request.headers
        if "transfer-encoding" in h:  # h11 refuses any coding but chunked (400) before this
            return error_response(411, "chunked request bodies are not supported; send Content-Length",
                                  code="length_required", close=True)
        cl = h.get("content-length")
        try:
            n = int(cl) if cl is not None else 0
            if n < 0:
                raise ValueError
        except ValueError:
            return error_response(400, f"bad Content-Length {cl!r}", code="invalid_content_length", close=True)
        if n > app.limits.max_body_bytes:
            return error_response(413, f"request body is {n} bytes; the limit is {app.limits.max_body_bytes}",
                                  code="request_too_large", close=True)
        ctype = h.get("content-type", "")
        if ctype.split(";", 1)[0].strip().lower() != "application/json":
            # a page on another site may POST a form or text/plain here without the browser asking
            # first (CORS preflight); application/json it may not
            return error_response(415, f"the request body must be JSON sent with Content-Type: application/json "
                                  f"(got {ctype or 'none'!r})", code="unsupported_media_type",
                                  close=_body_unread(request))
        try:
            body = await asyncio.wait_for(self._read_body(request), app.limits.body_timeout_s)
        except TimeoutError:  # asyncio.TimeoutError is TimeoutError from Python 3.11
            return error_response(408, f"the request body did not arrive within {app.limits.body_timeout_s:g} s",
                                  code="request_timeout", close=True)
        if body is None:  # the client hung up
            return Response(status_code=400)  # sent nowhere
        if app.scheduler.full():  # before decoding anything
            return error_response(429, "the server is busy (request queue full); retry later",
                                  code="too_many_requests", headers={"Retry-After": "1"})
        try:
            req, comp = await run_in_threadpool(self._decode_and_prepare, body)
        except RequestError as e:
            return error_response(e.status, str(e), param=e.param, code=e.code)
        except RecursionError:
            return error_response(400, "request is nested too deeply", code="invalid_request")
        except Exception:  # noqa: BLE001 - a bug, not the client's fault: say so (details in the log only), keep serving
            log.exception("could not prepare a request")
            return error_response(500, "internal error while reading the request (the server log has the details)")
        reply = _Reply(app.model_name, req, comp, asyncio.get_running_loop())
        try:
            app.scheduler.submit(comp)
        except QueueFull as e:
            return error_response(429, str(e), code="too_many_requests", headers={"Retry-After": "1"})
        return reply

    @staticmethod
    async def _read_body(request: Request) -> bytes | None:
        """The whole body (the framing was checked), or None when the client hung up."""
        chunks = []
        receive = request.receive
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _decode_and_prepare(self, body: bytes) -> tuple[dict, Completion]:
        """In a worker thread: JSON decoding and `App.prepare` (images, tokenization) block."""
        try:
            parsed = json.loads(body)
        except RecursionError:
            reject("request JSON is nested too deeply", None, "invalid_json")
        except ValueError as e:
            reject(f"request body is not valid JSON: {e}", None, "invalid_json")
        return self.app.prepare(parsed)


class _Reply:
    """The ASGI response of a submitted completion: its scheduler callbacks (on the engine thread)
    become events on the request's event loop; a watcher on the connection cancels the request
    when the client hangs up (the scheduler then frees its row and slot)."""

    def __init__(self, model_name: str, req: dict, comp: Completion, loop: asyncio.AbstractEventLoop):
        self.model_name, self.req, self.comp, self.loop = model_name, req, comp, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.done = False  # the completion has finished
        self.started = self.finished = False  # the HTTP response has started / been sent whole
        comp.on_delta = lambda text: self._put(("delta", text))
        comp.on_done = lambda c: self._put(("done", None))
        self.rid = "chatcmpl-" + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _put(self, event):  # on the engine thread
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server has stopped
            pass

    async def _watch(self, receive):
        """Until the client hangs up (the body was read: nothing else can arrive)."""
        while (await receive())["type"] != "http.disconnect":
            pass
        self.comp.cancelled = True
        self.events.put_nowait(("gone", None))

    async def _next(self):
        kind, text = await self.events.get()
        self.done = kind == "done"
        return kind, text

    async def __call__(self, scope, receive, send):
        watcher = asyncio.ensure_future(self._watch(receive))
        try:
            if self.req["stream"]:
                await self._stream(send, watcher)
            else:
                while (kind := (await self._next())[0]) not in ("done", "gone"):
                    pass
                watcher.cancel()
                if kind == "done":
                    self.started = self.finished = True  # (cancelled between its two sends: uvicorn closes)
                    await self._complete()(scope, receive, send)
        except asyncio.CancelledError:
            # uvicorn cancels the requests still running when a graceful shutdown runs out of time:
            # say so (the task ends here; nothing else awaits it) rather than uvicorn's plain 500
            self.comp.cancelled = True
            await self._shutting_down(scope, receive, send)
        finally:
            watcher.cancel()
            if not self.done:  # the client left, or the server is stopping: free the batch row
                self.comp.cancelled = True

    async def _shutting_down(self, scope, receive, send):
        message = "the server is shutting down; the request was cancelled (retry later)"
        try:
            if not self.started:
                await error_response(503, message, code="server_shutting_down", headers={"Retry-After": "1"},
                                     close=True)(scope, receive, send)
            elif not self.finished:
                for data in (json.dumps(error_body(message, "server_error", None, "server_shutting_down")).encode(),
                             b"[DONE]"):
                    await send({"type": "http.response.body", "body": b"data: " + data + b"\n\n", "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except Exception:  # noqa: BLE001 - the connection is going away anyway
            log.debug("could not tell a client about the shutdown", exc_info=True)

    def _complete(self) -> Response:
        comp = self.comp
        if comp.error:
            return error_response(500, _generation_failed(self.rid, comp), etype="server_error")
        return json_response(200, {
            "id": self.rid, "object": "chat.completion", "created": self.created, "model": self.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": comp.text},
                         "finish_reason": comp.finish_reason, "logprobs": None}],
            "usage": _usage(comp),
        })

    async def _stream(self, send, watcher):
        self.started = True
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})

        async def sse(obj):
            data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
            await send({"type": "http.response.body", "body": b"data: " + data + b"\n\n", "more_body": True})

        base = {"id": self.rid, "object": "chat.completion.chunk", "created": self.created, "model": self.model_name}

        def choice(delta, finish=None):
            return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

        await sse(choice({"role": "assistant", "content": ""}))
        while True:
            kind, text = await self._next()
            if kind == "gone":
                return
            if kind == "done":
                break
            await sse(choice({"content": text}))
        watcher.cancel()
        comp = self.comp
        if comp.error:
            await sse(error_body(_generation_failed(self.rid, comp), "server_error"))
        else:
            await sse(choice({}, comp.finish_reason))
            if self.req["include_usage"]:
                await sse({**base, "choices": [], "usage": _usage(comp)})
        await sse(b"[DONE]")
        self.finished = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def make_server(generator: ChatGenerator, host: str = "127.0.0.1", port: int = 8000, *,
                backlog: int = DEFAULT_BACKLOG, max_connections: int | None = DEFAULT_MAX_CONNECTIONS,
                keep_alive_s: float = DEFAULT_KEEP_ALIVE_S, graceful_shutdown_s: float = DEFAULT_GRACEFUL_SHUTDOWN_S,
                access_log: bool = False, **app_kw) -> Server:
    """A `Server` for `generator` bound to (host, port); `app_kw` go to `App` (limits, api_key,
    max_batch, window_s, max_pending, model_name, continuous, reserve_new_tokens)."""
    app = App(generator, **app_kw)
    return Server(app, lambda port: _Api(app, host, port).asgi, host, port, backlog=backlog, max_connections=max_connections,
                  keep_alive_s=keep_alive_s, graceful_shutdown_s=graceful_shutdown_s, access_log=access_log)


def serve_in_thread(server: Server, timeout: float = 30.0) -> threading.Thread:
    """`server.serve_forever()` in a daemon thread (no signal handlers there), once it is serving."""
    server._stopped.clear()
    t = threading.Thread(target=server.serve_forever, name="llava-serve", daemon=True)
    t.start()
    deadline = time.monotonic() + timeout
    while not server.started and t.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    return t
