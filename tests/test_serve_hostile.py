"""Serving under hostile input and load (issue 18): every request field is checked against the
engine's types before it reaches a batch; a failure inside a batch fails only its own requests,
tells every one of their clients and frees their slots; malformed text, huge prompts, foreign
Host headers and non-JSON bodies are refused before any expensive work; a client that hangs up
cancels its generation."""
import json
import socket
import threading
import time

import pytest

pytest.importorskip("torch")

from serve_util import error, http_request, make_chat_checkpoint, serving, stats, wait_for  # noqa: E402

from llava_jax.serve.engine import DecodeBatch, SamplingParams  # noqa: E402
from llava_jax.serve.generator import ChatGenerator, ChatSession, Completion  # noqa: E402
from llava_jax.serve.scheduler import BatchScheduler  # noqa: E402

URL = "/v1/chat/completions"
LONG_PROMPT = "Describe the scene in detail."


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    d, _, _ = make_chat_checkpoint(tmp_path_factory.mktemp("ckpt"), max_positions=128)
    return ChatGenerator.from_pretrained(d, chunk_size=4, name="tiny-llava")




@pytest.fixture(scope="module")
def server(gen):
    with serving(gen, window_s=0.0, max_pending=8) as srv:
        yield srv


def body(content="Hi", **kw):
    return {"model": "tiny-llava", "messages": [{"role": "user", "content": content}], "max_tokens": 2,
            "temperature": 0, **kw}








def in_thread(fn, *args, **kw):
    """Run fn in a thread; .join() it, then .result is its return value or the exception it raised."""
    t = threading.Thread(target=lambda: setattr(t, "result", _call(fn, *args, **kw)), daemon=True)
    t.start()
    return t


def _call(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except Exception as e:  # noqa: BLE001 - handed to the test
        return e


def sse_events(srv, b, timeout=30):
    status, data = http_request(srv, "POST", URL, b, timeout=timeout)
    return status, [e[len("data: "):] for e in data.decode().split("\n\n") if e.startswith("data: ")]


# ---------------------------------------------------------------------------- 1. field validation
BAD_FIELDS = [
    ("top_k", 2**31), ("top_k", -1), ("top_k", 1.0), ("temperature", 10**400), ("top_p", 10**400),
    ("top_p", -0.1), ("max_tokens", 2**31), ("max_completion_tokens", 0), ("max_completion_tokens", 10**30),
    ("max_completion_tokens", "8"), ("seed", "1"), ("seed", 2**64), ("n", 2), ("n", True), ("presence_penalty", 3),
    ("presence_penalty", 0.5), ("frequency_penalty", "x"), ("frequency_penalty", -1), ("logprobs", True),
    ("logprobs", "yes"), ("top_logprobs", 3), ("top_logprobs", -1), ("logit_bias", {"5": 10}), ("logit_bias", 3),
    ("stop", ["ok", "\ud800"]), ("stream_options", {"include_usage": 1}),
]


@pytest.mark.parametrize("field,value", BAD_FIELDS, ids=[f"{f}={str(v)[:12]}" for f, v in BAD_FIELDS])
def test_fields_out_of_engine_range_are_400_naming_the_field(server, field, value):
    status, data = http_request(server, "POST", URL, body(**{field: value}))
    assert status == 400, data
    assert error(data)["param"] == field


def test_fields_at_the_edge_of_their_range_are_served(server):
    ok = dict(top_k=2**31 - 1, temperature=2, top_p=0, seed=-2**63, presence_penalty=0, frequency_penalty=0.0,
              logprobs=False, top_logprobs=0, logit_bias={}, n=1, max_completion_tokens=1, user="u")
    status, data = http_request(server, "POST", URL, body(**ok))
    assert status == 200, data
    assert json.loads(data)["usage"]["completion_tokens"] == 1


# ---------------------------------------------------------------------------- 1. failures inside a batch
def test_huge_top_k_joining_a_running_batch_harms_nobody(gen):
    """top_k = 2**31 (which the server refuses; a library caller can still pass it) used to
    overflow the engine's int32 when it joined a running batch and drop the batch. The engine
    clamps it now ("every token"): both requests finish, the running one exactly as alone, and
    both queue slots are free again. (A request that fails to join: the injected-failure test.)"""
    sched = BatchScheduler(gen, max_batch=4, window_s=0.0, max_pending=2, reserve_new_tokens=16)
    try:
        msgs = [{"role": "user", "content": LONG_PROMPT}]
        p = SamplingParams(max_new_tokens=12)
        done = {k: threading.Event() for k in "ab"}
        bad = Completion(gen.encode([{"role": "user", "content": "What color is it?"}]),
                         SamplingParams(max_new_tokens=4, temperature=1.0, top_k=2**31), on_done=lambda c: done["b"].set())

        def on_delta(_text):  # on the batching thread, while `a` runs: `bad` joins at the next step
            if not sent:
                sent.append(sched.submit(bad))

        sent = []
        a = Completion(gen.encode(msgs), p, on_delta=on_delta, on_done=lambda c: done["a"].set())
        sched.submit(a)
        assert done["b"].wait(30) and done["a"].wait(30), "a request of the batch was dropped without an answer"
        assert bad.error is None and bad.finish_reason in ("length", "stop")
        assert a.error is None and a.finish_reason == "length" and a.text == gen.chat(msgs, p).text
        st = sched.stats()
        assert st["running"] == 0 and st["queued"] == 0 and st["request_errors"] == 0, st
        more = [threading.Event() for _ in range(2)]  # max_pending=2: both slots were freed
        for ev in more:
            sched.submit(Completion(gen.encode(msgs), SamplingParams(max_new_tokens=2), on_done=lambda c, ev=ev: ev.set()))
        assert all(ev.wait(30) for ev in more)
    finally:
        sched.close()


def test_failed_batch_tells_every_client_and_frees_their_slots(gen, monkeypatch):
    with serving(gen, window_s=0.5, max_batch=4, max_pending=2) as srv:
        step = DecodeBatch.step
        failed = []

        def failing_step(self):  # the engine fails once, when the batch holds both requests
            if not failed and self.active.sum() == 2:
                failed.append(1)
                raise RuntimeError("injected engine failure /secret/path")
            return step(self)

        monkeypatch.setattr(DecodeBatch, "step", failing_step)
        streamed = in_thread(sse_events, srv, body(LONG_PROMPT, max_tokens=16, stream=True))
        plain = in_thread(http_request, srv, "POST", URL, body(LONG_PROMPT, max_tokens=16), timeout=30)
        streamed.join(40)
        plain.join(40)
        status, events = streamed.result
        assert status == 200 and events[-1] == "[DONE]", events  # the stream ends properly
        err = json.loads(events[-2])["error"]
        assert err["type"] == "server_error" and "injected" not in err["message"]  # no internals leak
        status, data = plain.result
        assert status == 500 and "injected" not in error(data)["message"]
        st = stats(srv)
        assert failed and st["running"] == 0 and st["queued"] == 0 and st["request_errors"] == 2, st
        monkeypatch.setattr(DecodeBatch, "step", step)
        again = [in_thread(http_request, srv, "POST", URL, body(), timeout=30) for _ in range(2)]
        for t in again:  # max_pending=2: both slots were freed
            t.join(40)
            assert t.result[0] == 200, t.result


def test_failed_join_fails_only_the_joiner(gen, monkeypatch):
    with serving(gen, window_s=0.0, max_batch=4, max_pending=2) as srv:
        alone = http_request(srv, "POST", URL, body(LONG_PROMPT, max_tokens=16))
        assert alone[0] == 200
        sched, step, held = srv.app.scheduler, DecodeBatch.step, threading.Event()

        def held_step(self):  # hold the first batch's first step until the second request is queued
            if not held.is_set():
                wait_for(lambda: sched.stats()["queued"] >= 1)
                held.set()
            return step(self)

        def failing_join(self, requests):
            raise RuntimeError("injected join failure")

        monkeypatch.setattr(DecodeBatch, "step", held_step)
        monkeypatch.setattr(DecodeBatch, "join", failing_join)
        first = in_thread(http_request, srv, "POST", URL, body(LONG_PROMPT, max_tokens=16), timeout=30)
        assert wait_for(lambda: sched.stats()["running"] == 1)
        joiner = in_thread(http_request, srv, "POST", URL, body("What color is it?", max_tokens=4), timeout=30)
        first.join(40)
        joiner.join(40)
        assert joiner.result[0] == 500 and "injected" not in error(joiner.result[1])["message"]
        assert first.result[0] == 200, first.result  # the running batch was not dropped
        assert json.loads(first.result[1])["choices"] == json.loads(alone[1])["choices"]
        st = stats(srv)
        assert st["running"] == 0 and st["queued"] == 0, st
        monkeypatch.undo()
        again = [in_thread(http_request, srv, "POST", URL, body(), timeout=30) for _ in range(2)]
        for t in again:
            t.join(40)
            assert t.result[0] == 200, t.result


# ---------------------------------------------------------------------------- 2. text
@pytest.mark.parametrize("messages,param", [
    ('[{"role": "user", "content": "hi \\ud800"}]', "messages[0].content"),
    ('[{"role": "user", "content": [{"type": "text", "text": "\\udfff x"}]}]', "messages[0].content[0].text"),
    ('[{"role": "system", "content": "a\\ud83d"}, {"role": "user", "content": "b"}]', "messages[0].content"),
])
def test_lone_surrogate_is_400_without_internals(server, messages, param):
    raw = '{"model": "tiny-llava", "max_tokens": 2, "messages": %s}' % messages
    status, data = http_request(server, "POST", URL, raw.encode())
    assert status == 400, data
    err = error(data)
    assert err["param"] == param and "Error" not in err["message"], err


def test_image_token_split_over_two_text_parts_is_400(server):
    content = [{"type": "text", "text": "look <ima"}, {"type": "text", "text": "ge> here"}]
    status, data = http_request(server, "POST", URL, body(content))
    assert status == 400 and "<image>" in error(data)["message"]


# ---------------------------------------------------------------------------- 3. cheap checks first
def test_huge_prompt_is_refused_without_tokenizing(server, monkeypatch):
    calls = []
    encode = ChatGenerator.encode
    monkeypatch.setattr(ChatGenerator, "encode", lambda self, m: (calls.append(1), encode(self, m))[1])
    t0 = time.perf_counter()
    status, data = http_request(server, "POST", URL, body("word " * 400_000))  # 2 MB of text
    took = time.perf_counter() - t0
    assert status == 400 and error(data)["code"] == "context_length_exceeded"
    assert not calls, "the prompt was tokenized"
    print(f"\n2 MB prompt refused in {took * 1000:.0f} ms")
    status, data = http_request(server, "POST", URL, body("word " * 200))  # under the bound: counted in tokens
    assert status == 400 and error(data)["code"] == "context_length_exceeded" and calls


def test_api_key_is_checked_before_the_body_is_read(gen):
    with serving(gen, api_key="sekret") as srv:
        host, port = srv.server_address[:2]
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                      b"Authorization: Bearer wrong\r\nContent-Length: 40000000\r\n\r\n" % (host.encode(), port))
            reply = b""
            while chunk := s.recv(65536):  # answered, and closed, with none of the 40 MB sent
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 401"), reply
        assert error(reply.split(b"\r\n\r\n", 1)[1])["code"] == "invalid_api_key"


# ---------------------------------------------------------------------------- 4. Host and content type
HOSTS = [("127.0.0.1:{port}", True), ("localhost:{port}", True), ("LocalHost:{port}", True), ("[::1]:{port}", True),
         ("evil.example:{port}", False), ("localhost.evil.example:{port}", False), ("localhost:1", False),
         ("127.0.0.1", False), ("", False)]


@pytest.mark.parametrize("host,ok", HOSTS)
def test_without_api_key_only_local_host_headers_are_served(server, host, ok):
    """DNS rebinding: a web page whose name resolves to 127.0.0.1 sends its own name as Host."""
    h = host.format(port=server.server_address[1])
    for method, path, b in (("GET", "/v1/models", None), ("POST", URL, body())):
        status, data = http_request(server, method, path, b, headers={"Host": h, "Content-Type": "application/json"})
        if ok:
            assert status == 200, data
        else:
            assert status == 403 and error(data)["code"] == "host_not_allowed", data


def test_with_api_key_any_host_is_served(gen):
    with serving(gen, api_key="sekret") as srv:
        status, _ = http_request(srv, "GET", "/v1/models", headers={"Host": "llava.example:443",
                                                                    "Authorization": "Bearer sekret"})
        assert status == 200


@pytest.mark.parametrize("ctype,ok", [
    (None, False), ("text/plain", False), ("application/x-www-form-urlencoded", False),
    ("multipart/form-data; boundary=x", False), ("application/jsonp", False), ("application/json", True),
    ("application/json; charset=utf-8", True), ("Application/JSON;charset=UTF-8", True)])
def test_post_bodies_must_be_json(server, ctype, ok):
    """A page on another origin can POST a form or text/plain without a CORS preflight; not JSON."""
    status, data = http_request(server, "POST", URL, body(max_tokens=1), headers={} if ctype is None else
                                {"Content-Type": ctype})
    assert status == (200 if ok else 415), data
    if not ok:
        assert error(data)["code"] == "unsupported_media_type"


# ---------------------------------------------------------------------------- 5. disconnects
def test_client_disconnect_cancels_a_non_streaming_request(gen, monkeypatch):
    with serving(gen, window_s=0.0) as srv:
        b = json.dumps(body(LONG_PROMPT, max_tokens=16)).encode()
        status, data = http_request(srv, "POST", URL, b)
        assert status == 200 and json.loads(data)["choices"][0]["finish_reason"] == "length"  # 16 tokens, no EOS
        reasons, end, step = [], ChatSession._end, DecodeBatch.step
        monkeypatch.setattr(ChatSession, "_end", lambda self, slot, reason: (reasons.append(reason),
                                                                              end(self, slot, reason))[1])
        monkeypatch.setattr(DecodeBatch, "step", lambda self: (time.sleep(0.3), step(self))[1])  # a slow model
        host, port = srv.server_address[:2]
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (host.encode(), port, len(b), b))
            assert wait_for(lambda: stats(srv)["running"] == 1)
        assert wait_for(lambda: reasons, 10) and reasons == ["cancelled"], reasons
        assert wait_for(lambda: stats(srv)["running"] == 0, 5) and stats(srv)["requests_cancelled"] == 1


# ---------------------------------------------------------------------------- image bytes
def _encoded(fmt: str, size=(8, 6)) -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 40)).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_accepted_image_formats_decode(fmt):
    from llava_jax.serve.generator import decode_image
    img = decode_image(_encoded(fmt))
    assert img.mode == "RGB" and img.size == (8, 6)


@pytest.mark.parametrize("fmt", ["ICO", "TIFF", "PPM", "TGA"])
def test_other_pillow_formats_are_refused(fmt):
    from llava_jax.serve.generator import RequestError, decode_image
    with pytest.raises(RequestError) as e:
        decode_image(_encoded(fmt, (16, 16)))
    assert e.value.code == "invalid_image" and "PNG/JPEG/WEBP/GIF/BMP" in str(e.value)


def test_eps_never_reaches_ghostscript(monkeypatch):
    from PIL import EpsImagePlugin

    from llava_jax.serve.generator import RequestError, decode_image
    called = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: called.append(a))
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: called.append("open"))
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto showpage\n"
    with pytest.raises(RequestError) as e:
        decode_image(eps)  # sent as data:image/png: the bytes decide, and they are not allowed
    assert e.value.code == "invalid_image" and called == []


def test_pixel_limit_from_the_header_before_decoding(monkeypatch):
    """A PNG whose header says 12000x12000 is refused (413) from the header alone."""
    import struct
    import zlib

    from PIL import ImageFile

    from llava_jax.serve.generator import RequestError, decode_image
    png = bytearray(_encoded("PNG"))
    ihdr = bytearray(png[16:29])  # width, height, depth, colour type, ...
    ihdr[0:8] = struct.pack(">II", 12000, 12000)
    png[16:29] = ihdr
    png[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    loads = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self) or None)
    with pytest.raises(RequestError) as e:
        decode_image(bytes(png), max_pixels=40_000_000)
    assert e.value.status == 413 and "12000x12000" in str(e.value) and loads == []
