"""The HTTP transport of the API server: uvicorn's HTTP/1.1 server (h11) on a socket bound here,
one asyncio event loop, graceful shutdown. The routes are in `server.py`.

`Server` binds at construction (`server_address` is the real address, also for port 0), runs
uvicorn in the calling thread (`serve_forever`; under the main thread SIGINT / SIGTERM shut it
down gracefully) and stops it from another thread (`shutdown`). `_Protocol` adds to uvicorn's
h11 connection what it lacks: a JSON 400 for malformed HTTP, a deadline for the request head and
for a client that stops reading its reply.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import threading

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from llava_jax.serve.request import Limits, error_body

log = logging.getLogger(__name__)
DEFAULT_BACKLOG = 2048
DEFAULT_MAX_CONNECTIONS = 512
DEFAULT_KEEP_ALIVE_S = 5.0
DEFAULT_GRACEFUL_SHUTDOWN_S = 30.0


class _Protocol(H11Protocol):
    """uvicorn's h11 connection, plus: malformed HTTP is answered with this server's JSON 400; a
    request head (request line and headers) must be complete within `limits.header_timeout_s`
    of the connection or of its first byte (uvicorn itself times only idle keep-alive
    connections); a client that leaves a reply unread (the transport's buffer stays full) for
    `limits.send_timeout_s` is dropped."""

    limits: Limits = Limits()

    def connection_made(self, transport):
        self._head_timer = self._stall_timer = None
        super().connection_made(transport)
        self._time_head()

    def data_received(self, data: bytes):
        super().data_received(data)
        self._time_head()

    def _time_head(self):
        waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if waiting and self._head_timer is None:
            self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timeout)
        elif not waiting and self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self):
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.info("closing a connection whose request head did not arrive within %g s", self.limits.header_timeout_s)
            self.transport.close()

    def pause_writing(self):
        super().pause_writing()
        if self._stall_timer is None:
            self._stall_timer = self.loop.call_later(self.limits.send_timeout_s, self._stalled)

    def resume_writing(self):
        super().resume_writing()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _stalled(self):
        self._stall_timer = None
        log.info("dropping a connection whose client read nothing for %g s", self.limits.send_timeout_s)
        self.transport.abort()

    def connection_lost(self, exc):
        for timer in (self._head_timer, self._stall_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._stall_timer = None
        super().connection_lost(exc)

    def send_400_response(self, msg: str):
        data = json.dumps(error_body(f"malformed HTTP request: {msg}", "invalid_request_error", None,
                                     "bad_request")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                   (b"connection", b"close")]
        try:
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=data),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:  # a response had already started: nothing more can be said
            pass
        self.transport.close()


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        """SIGINT / SIGTERM start the graceful shutdown (a second SIGINT forces it), in the main
        thread only; unlike uvicorn's own, the signal is not raised again afterwards, so the
        caller closes the scheduler and exits normally."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    """A listening TCP socket on (host, port), IPv4 first where the name has both (as the standard
    library server did); listening from here on, so connections made before the event loop runs
    wait in the backlog."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = next((i for i in infos if i[0] == socket.AF_INET), infos[0])
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


class Server:
    """The API on a socket bound at construction (`server_address` is the real address, also for
    port 0): `serve_forever()` runs uvicorn on its own event loop in the calling thread (under
    the main thread SIGINT / SIGTERM shut it down gracefully); `shutdown()` from another thread
    stops it gracefully and waits, then stops the scheduler; `server_close()` releases the socket
    and the scheduler."""

    def __init__(self, app, asgi_for_port, host: str, port: int, *, backlog: int = DEFAULT_BACKLOG,
                 max_connections: int | None = DEFAULT_MAX_CONNECTIONS, keep_alive_s: float = DEFAULT_KEEP_ALIVE_S,
                 graceful_shutdown_s: float = DEFAULT_GRACEFUL_SHUTDOWN_S, access_log: bool = False):
        self.app = app
        self.bound_host = host  # as given (server_address holds the address it resolved to)
        self.graceful_shutdown_s = graceful_shutdown_s
        self.socket = _listen(host, port, backlog)
        self.server_address = self.socket.getsockname()
        protocol = type("LlavaH11Protocol", (_Protocol,), {"limits": app.limits})
        for name in ("uvicorn.error", "uvicorn.asgi"):  # quiet by default: warnings and errors only
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.WARNING)
        if access_log:
            logging.getLogger("uvicorn.access").setLevel(logging.INFO)
        config = uvicorn.Config(
            asgi_for_port(self.server_address[1]), http=protocol, ws="none", lifespan="off", interface="asgi3", log_config=None,
            access_log=access_log, backlog=backlog, limit_concurrency=max_connections,
            timeout_keep_alive=keep_alive_s, timeout_graceful_shutdown=graceful_shutdown_s, proxy_headers=False,
            server_header=False, headers=[("server", "llava-jax")])
        self._uvicorn = _Uvicorn(config)
        self._stopped = threading.Event()
        self._stopped.set()

    @property
    def started(self) -> bool:
        return self._uvicorn.started

    def serve_forever(self, poll_interval: float | None = None):
        """Serve until `shutdown()` or, in the main thread, SIGINT / SIGTERM. (`poll_interval`:
        accepted for the standard library server's signature; unused.)"""
        self._stopped.clear()
        try:
            asyncio.run(self._uvicorn.serve(sockets=[self.socket]))
        finally:
            self._stopped.set()

    def shutdown(self):
        """Graceful: stop accepting, let the requests in progress finish (at most
        `graceful_shutdown_s`; then they are cancelled), then stop the scheduler."""
        self._uvicorn.should_exit = True
        bound = (self.graceful_shutdown_s or 0) + 10
        if not self._stopped.wait(bound):
            log.warning("the server did not stop within %g s; forcing it", bound)
            self._uvicorn.force_exit = True
            self._stopped.wait(5)
        self.app.scheduler.close()

    def server_close(self):
        self.socket.close()
        self.app.scheduler.close()
