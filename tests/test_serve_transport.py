"""The HTTP transport (uvicorn + Starlette, issue 18) under load and misbehaving clients: 64
concurrent clients on loopback get only 200 or 429 (no reset, no 5xx) and the server answers
as before afterwards; clients that hang up (streaming, non-streaming, still queued) cancel their
requests; a stalled upload gets 408 and a stalled request head is dropped; malformed HTTP gets
this server's JSON 400; shutdown is graceful (requests in flight finish, new connections are
refused; past the bound they are cancelled with a JSON 503); `python -m llava_jax.serve` shuts
down gracefully on SIGTERM."""
import contextlib
import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("torch")

from serve_util import error, http_request, make_chat_checkpoint, serving, stats, wait_for  # noqa: E402

from llava_jax.serve.engine import DecodeBatch  # noqa: E402
from llava_jax.serve.generator import ChatGenerator  # noqa: E402
from llava_jax.serve.server import Limits, make_server, serve_in_thread  # noqa: E402

URL = "/v1/chat/completions"
PROMPT = "Describe the scene in detail."


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d, _, _ = make_chat_checkpoint(tmp_path_factory.mktemp("ckpt"), max_positions=128)
    return d


@pytest.fixture(scope="module")
def gen(ckpt):
    return ChatGenerator.from_pretrained(ckpt, chunk_size=4, name="tiny-llava")


@pytest.fixture(scope="module")
def server(gen):
    with serving(gen) as srv:
        yield srv




def body(content=PROMPT, **kw):
    return {"model": "tiny-llava", "messages": [{"role": "user", "content": content}], "max_tokens": 4,
            "temperature": 0, **kw}








def raw_exchange(srv, data: bytes, timeout=10.0) -> bytes:
    """Send `data` on a new connection; everything the server sends until it closes it."""
    with socket.create_connection(srv.server_address[:2], timeout=timeout) as s:
        s.sendall(data)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return reply


def post_head(srv, n: int, extra: bytes = b"") -> bytes:
    host, port = srv.server_address[:2]
    return (b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
            % (URL.encode(), host.encode(), port, n, extra))


@pytest.fixture
def slow_model(monkeypatch):
    """Each decode step (4 tokens) takes at least `delay[0]` seconds: a model slow enough for a
    request to be caught in flight."""
    delay = [0.3]
    step = DecodeBatch.step
    monkeypatch.setattr(DecodeBatch, "step", lambda self: (time.sleep(delay[0]), step(self))[1])
    return delay


# ---------------------------------------------------------------------------- load
def test_64_concurrent_clients_get_200_or_429_and_the_server_still_answers(gen, slow_model):
    slow_model[0] = 0.05
    n_clients, per_client = 64, 3
    with serving(gen, window_s=0.01, max_batch=4, max_pending=4) as srv:
        before = http_request(srv, "POST", URL, body())
        assert before[0] == 200, before
        statuses, failures, lock = [], [], threading.Lock()
        start = threading.Barrier(n_clients)

        def client(i):
            conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=120)
            try:
                start.wait()
                for k in range(per_client):  # keep-alive: three requests on one connection
                    b = body(f"{PROMPT} {i} {k}", stream=(i + k) % 3 == 0)
                    conn.request("POST", URL, json.dumps(b), {"Content-Type": "application/json"})
                    r = conn.getresponse()
                    data = r.read()
                    with lock:
                        statuses.append(r.status)
                    if r.status == 429:
                        assert r.getheader("Retry-After") == "1" and error(data)["code"] == "too_many_requests"
                    elif r.status == 200 and b["stream"]:
                        assert data.rstrip().endswith(b"data: [DONE]"), data[-200:]
                    elif r.status == 200:
                        assert json.loads(data)["usage"]["completion_tokens"] >= 1
            except Exception as e:  # noqa: BLE001 - a reset, a timeout or a wrong reply: the test fails
                with lock:
                    failures.append(repr(e))
            finally:
                conn.close()

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(n_clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        took = time.perf_counter() - t0
        counts = {s: statuses.count(s) for s in sorted(set(statuses))}
        print(f"\n{n_clients} clients x {per_client} requests in {took:.1f}s: status counts {counts}, "
              f"failures {len(failures)}")
        assert not failures, failures[:5]
        assert len(statuses) == n_clients * per_client and set(statuses) <= {200, 429}, counts
        assert counts.get(200, 0) >= 4 and counts.get(429, 0) > 0, counts
        st = stats(srv)
        assert st["queued"] == 0 and st["running"] == 0 and st["request_errors"] == 0, st
        after = http_request(srv, "POST", URL, body())
        assert after[0] == 200
        assert json.loads(after[1])["choices"] == json.loads(before[1])["choices"]  # the same answer as before


# ---------------------------------------------------------------------------- disconnects
def test_disconnect_cancels_a_streaming_request(gen, slow_model):
    with serving(gen, window_s=0.0) as srv:
        with socket.create_connection(srv.server_address[:2], timeout=10) as s:
            b = json.dumps(body(max_tokens=16, stream=True)).encode()
            s.sendall(post_head(srv, len(b)) + b)
            first = s.recv(65536)  # the head and the first event (the assistant role)
            assert first.startswith(b"HTTP/1.1 200") and b"text/event-stream" in first, first
            assert wait_for(lambda: stats(srv)["running"] == 1)
        assert wait_for(lambda: stats(srv)["requests_cancelled"] == 1, 30), stats(srv)
        st = stats(srv)
        assert st["running"] == 0 and st["queued"] == 0 and st["generated_tokens"] < 16, st


def test_disconnect_while_queued_cancels_without_running(gen, slow_model):
    """max_batch=1, windowed: the second request waits in the queue behind the first; its client
    leaves; it is dropped when its turn comes (never run), and the first is served in full."""
    with serving(gen, window_s=0.0, max_batch=1, continuous=False) as srv:
        first = threading.Thread(target=lambda: setattr(first, "result", http_request(
            srv, "POST", URL, body(max_tokens=16), timeout=60)), daemon=True)
        first.start()
        assert wait_for(lambda: stats(srv)["running"] == 1)
        with socket.create_connection(srv.server_address[:2], timeout=10) as s:
            b = json.dumps(body("What color is it?", max_tokens=16)).encode()
            s.sendall(post_head(srv, len(b)) + b)
            assert wait_for(lambda: stats(srv)["queued"] == 1)
        first.join(60)
        assert first.result[0] == 200 and json.loads(first.result[1])["usage"]["completion_tokens"] == 16
        assert wait_for(lambda: stats(srv)["requests_cancelled"] == 1, 30), stats(srv)
        st = stats(srv)
        assert st["batches"] == 1 and st["generated_tokens"] == 16 and st["queued"] == 0, st


# ---------------------------------------------------------------------------- stalled clients
def test_stalled_upload_gets_408_and_frees_the_connection(gen):
    with serving(gen, Limits(body_timeout_s=1.0), max_pending=1) as srv:
        t0 = time.perf_counter()
        reply = raw_exchange(srv, post_head(srv, 1000) + b'{"model": "tiny-')  # 16 of 1000 bytes, then silence
        took = time.perf_counter() - t0
        assert reply.startswith(b"HTTP/1.1 408"), reply
        assert error(reply.split(b"\r\n\r\n", 1)[1])["code"] == "request_timeout"
        assert 0.9 < took < 8, took
        assert stats(srv)["queued"] == 0
        assert http_request(srv, "POST", URL, body())[0] == 200  # max_pending=1: nothing was held


def test_stalled_request_head_and_idle_keep_alive_are_closed(gen):
    with serving(gen, Limits(header_timeout_s=1.0), keep_alive_s=1) as srv:
        port = srv.server_address[1]
        for sent in (b"", b"GET /health HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % port):  # silent; headers unfinished
            t0 = time.perf_counter()
            assert raw_exchange(srv, sent) == b""  # closed without an answer
            assert 0.9 < time.perf_counter() - t0 < 8
        # a whole request, then nothing: answered, and the idle connection closed after keep_alive_s
        t0 = time.perf_counter()
        reply = raw_exchange(srv, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % port)
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b'"model": "tiny-llava"}'), reply
        assert 0.9 < time.perf_counter() - t0 < 8


def test_client_that_stops_reading_is_dropped(gen):
    """2000 pipelined requests for the 10 kB page, none of the replies read: once the buffers are
    full, the server waits send_timeout_s, then drops the connection (what the kernel still holds
    for it drains on its own; the server keeps nothing)."""
    with serving(gen, Limits(send_timeout_s=1.0)) as srv:
        connections = srv._uvicorn.server_state.connections
        request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % srv.server_address[1]
        with socket.create_connection(srv.server_address[:2], timeout=10) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(request * 2000)
            assert wait_for(lambda: len(connections) == 1, 5)
            t0 = time.perf_counter()
            assert wait_for(lambda: not connections, 30), "the stalled connection is still open"
            assert time.perf_counter() - t0 > 0.3  # not at once: after send_timeout_s of no progress
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close without reading
        assert http_request(srv, "GET", "/health")[0] == 200


# ---------------------------------------------------------------------------- HTTP errors
@pytest.mark.parametrize("request_bytes,status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nBad Header\r\n\r\n", 400),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: x\r\n\r\n", 400),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411),
    (b"FOO /v1/models HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n", 405),
    (b"DELETE /v1/models HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n", 405),
    (b"GET /nothing HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n", 404),
    (b"GET /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n", 404),
    (b"POST /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 2\r\n\r\n{}", 404),
], ids=["garbage", "bad_header", "bad_content_length", "unknown_coding", "chunked", "unknown_method", "delete",
        "no_route", "get_on_post_route", "post_on_get_route"])
def test_bad_http_is_answered_in_json_and_closed(server, request_bytes, status):
    srv = server
    reply = raw_exchange(srv, request_bytes.replace(b"{port}", str(srv.server_address[1]).encode()))
    head, _, data = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d" % status), reply
    assert b"content-type: application/json" in head.lower()
    error(data)
    if status == 405:
        assert b"allow: get, post" in head.lower()


def test_a_bug_is_a_json_500_without_internals(server, monkeypatch):
    def broken():
        raise RuntimeError("/secret/path")

    monkeypatch.setattr(server.app, "models", broken)
    status, data = http_request(server, "GET", "/v1/models")
    assert status == 500 and "secret" not in error(data)["message"]
    monkeypatch.undo()
    assert http_request(server, "GET", "/v1/models")[0] == 200


def test_options_and_head(server):
    with contextlib.nullcontext(server) as srv:
        reply = raw_exchange(srv, b"OPTIONS /anything HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n"
                             % srv.server_address[1])
        assert reply.startswith(b"HTTP/1.1 204") and b"allow: get, post, options" in reply.lower()
        reply = raw_exchange(srv, b"HEAD /health HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n"
                             % srv.server_address[1])
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"\r\n\r\n")  # headers only


# ---------------------------------------------------------------------------- shutdown
def test_graceful_shutdown_finishes_requests_in_flight_and_refuses_new_ones(gen, slow_model):
    slow_model[0] = 0.5  # 16 tokens: 4 steps of 4, about 2 s
    srv = make_server(gen, "127.0.0.1", 0, limits=Limits(max_tokens=16), graceful_shutdown_s=30)
    serve_in_thread(srv)
    addr = srv.server_address[:2]
    try:
        flight = threading.Thread(target=lambda: setattr(flight, "result", http_request(
            srv, "POST", URL, body(max_tokens=16, stream=False), timeout=60)), daemon=True)
        flight.start()
        assert wait_for(lambda: stats(srv)["running"] == 1)
        stopper = threading.Thread(target=srv.shutdown, daemon=True)
        stopper.start()

        def refused():
            try:
                socket.create_connection(addr, timeout=2).close()
            except ConnectionRefusedError:
                return True
            return False

        assert wait_for(refused, 10), "the listening socket still accepts during shutdown"
        assert flight.is_alive(), "the request ended before new connections were refused"
        flight.join(60)
        stopper.join(60)
        assert not stopper.is_alive()
        status, data = flight.result
        assert status == 200, data  # finished, not cut off
        assert json.loads(data)["usage"]["completion_tokens"] == 16
        assert refused()
    finally:
        srv.server_close()


def test_shutdown_past_its_bound_cancels_with_a_json_503(gen, slow_model):
    slow_model[0] = 1.0  # 16 tokens: about 4 s, more than the 1 s bound
    srv = make_server(gen, "127.0.0.1", 0, limits=Limits(max_tokens=16), graceful_shutdown_s=1)
    serve_in_thread(srv)
    try:
        flight = threading.Thread(target=lambda: setattr(flight, "result", http_request(
            srv, "POST", URL, body(max_tokens=16), timeout=60)), daemon=True)
        flight.start()
        assert wait_for(lambda: srv.app.scheduler.stats()["running"] == 1)
        t0 = time.perf_counter()
        srv.shutdown()
        took = time.perf_counter() - t0
        flight.join(30)
        status, data = flight.result
        assert status == 503 and error(data)["code"] == "server_shutting_down", (status, data)
        assert took < 8, took
        assert wait_for(lambda: srv.app.scheduler.stats()["requests_cancelled"] == 1, 30)
    finally:
        srv.server_close()


def test_serve_main_shuts_down_gracefully_on_sigterm(ckpt, tmp_path):
    """`python -m llava_jax.serve` in a subprocess: SIGTERM while a request is generating; the
    request gets its 200, then the process exits 0 (uvicorn's signal handling, main thread)."""
    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "llava_jax.serve", "--model", str(ckpt), "--port", str(port),
                             "--served-model-name", "tiny-llava", "--decode-chunk", "1", "--max-tokens", "72",
                             "--log-level", "WARNING"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        out = []
        while "llava-jax serving" not in "".join(out):  # printed once it is ready
            line = proc.stdout.readline()
            assert line, "".join(out)
            out.append(line)

        class Srv:
            server_address = ("127.0.0.1", port)

        assert http_request(Srv, "POST", URL, body(max_tokens=2))[0] == 200  # compiled
        flight = threading.Thread(target=lambda: setattr(flight, "result", http_request(
            Srv, "POST", URL, body(max_tokens=72), timeout=120)), daemon=True)
        flight.start()
        assert wait_for(lambda: json.loads(http_request(Srv, "GET", "/stats")[1])["running"] == 1)
        proc.send_signal(signal.SIGTERM)
        flight.join(120)
        status, data = flight.result
        assert status == 200, data
        assert proc.wait(60) == 0, proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_fuzz_tool_reads_replies():
    from llava_jax.tools.serve_fuzz import parse_replies

    json_reply = b'HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n{}'
    stream = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
              b"9\r\ndata: {}\n\n\r\ne\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
    assert parse_replies(json_reply + stream) == [200, 200]
    assert parse_replies(stream.replace(b"[DONE]", b"[NOPE]")) == ["bad_stream"]
    assert parse_replies(b"HTTP/1.1 204 No Content\r\n\r\n") == [204]
    assert parse_replies(b"") == ["closed"] and parse_replies(b"junk") == ["garbled"]


@pytest.mark.slow
def test_fuzz_tool_smoke(tmp_path):
    """A short run of `python -m llava_jax.tools.serve_fuzz`: no 5xx, reset or unexpected reply."""
    from llava_jax.tools.serve_fuzz import main

    out = tmp_path / "fuzz.json"
    assert main(["--requests", "150", "--warm-requests", "30", "--concurrency", "8", "--out", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["requests"] == 150 and "5xx" not in figures["status_classes"] and figures["resets"] == 0
