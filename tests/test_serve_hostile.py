"""Serving under hostile input and load (issue 18): every request field is checked against the
engine's types before it reaches a batch; a failure inside a batch fails only its own requests,
tells every one of their clients and frees their slots; malformed text, huge prompts, foreign
Host headers and non-JSON bodies are refused before any expensive work; a client that hangs up
cancels its generation."""
import contextlib
import json
import threading
import time

import pytest

pytest.importorskip("torch")

from serve_util import http_request, make_chat_checkpoint  # noqa: E402

from llava_jax.serve.generator import ChatGenerator  # noqa: E402
from llava_jax.serve.server import Limits, make_server, serve_in_thread  # noqa: E402

URL = "/v1/chat/completions"
LONG_PROMPT = "Describe the scene in detail."


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    d, _, _ = make_chat_checkpoint(tmp_path_factory.mktemp("ckpt"), max_positions=128)
    return ChatGenerator.from_pretrained(d, chunk_size=4, name="tiny-llava")


@contextlib.contextmanager
def serving(gen, **kw):
    srv = make_server(gen, "127.0.0.1", 0, limits=Limits(max_tokens=16, default_max_tokens=8), **kw)
    serve_in_thread(srv)
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture(scope="module")
def server(gen):
    with serving(gen, window_s=0.0, max_pending=8) as srv:
        yield srv


def body(content="Hi", **kw):
    return {"model": "tiny-llava", "messages": [{"role": "user", "content": content}], "max_tokens": 2,
            "temperature": 0, **kw}


def error(data) -> dict:
    err = json.loads(data)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return err


def stats(srv) -> dict:
    return json.loads(http_request(srv, "GET", "/stats")[1])


def wait_for(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


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


