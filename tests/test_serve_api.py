"""The OpenAI-compatible server, driven by the official `openai` client on 127.0.0.1: completions,
streaming, stop strings, seeds, API keys, batching of concurrent requests, 429 on a full queue,
and 4xx JSON errors (never 5xx) for bad requests, including a hypothesis fuzz run."""
import base64
import http.client
import json
import os
import threading
from pathlib import Path

import pytest

pytest.importorskip("torch")
openai = pytest.importorskip("openai")

from serve_util import http_request as _raw  # noqa: E402
from serve_util import (CHAT_BACKBONES, STEER_QUESTION, chat_reference, make_chat_checkpoint, png_bytes,  # noqa: E402
                        rand_image, steer_messages)

from llava_jax.serve.engine import SamplingParams  # noqa: E402
from llava_jax.serve.generator import ChatGenerator  # noqa: E402
from llava_jax.serve.server import Limits, make_server, serve_in_thread  # noqa: E402

ARTIFACTS = Path(os.environ.get("LLAVA_JAX_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
LIMITS = dict(max_tokens=16, default_max_tokens=8, max_image_bytes=300_000, max_image_pixels=1_000_000, max_images=2)


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    d, _, _ = make_chat_checkpoint(tmp_path_factory.mktemp("ckpt"), max_positions=128)
    return ChatGenerator.from_pretrained(d, chunk_size=4, name="tiny-llava")


def _start(gen, **kw):
    srv = make_server(gen, "127.0.0.1", 0, limits=Limits(**LIMITS), **kw)
    serve_in_thread(srv)
    return srv


@pytest.fixture(scope="module")
def server(gen):
    srv = _start(gen, window_s=0.25, max_batch=8, max_pending=16)
    yield srv
    srv.shutdown()
    srv.server_close()


def _client(srv, key="none"):
    host, port = srv.server_address[:2]
    return openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key=key, max_retries=0, timeout=120)


def _data_url(img) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()


def _image_msg(text="What is in the image?", seed=0):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(rand_image(seed))}},
                                         {"type": "text", "text": text}]}]


def test_models_health_and_page(server):
    assert [m.id for m in _client(server).models.list().data] == ["tiny-llava"]
    status, body = _raw(server, "GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body = _raw(server, "GET", "/")
    assert status == 200 and b"<title>llava-jax chat</title>" in body


# Qwen2 with a CLIP tower is left to the slow run: SigLIP x Qwen2 serves the same LLM (CI time).
@pytest.fixture(scope="module", params=["llama", pytest.param("qwen2", marks=pytest.mark.slow),
                                        "mistral_window", "siglip_qwen2"])
def backbone_server(request, server, gen, tmp_path_factory):
    """(server, generator, checkpoint dir or None, backbone): the module's LLaMA one, or a server on another
    backbone (serve_util.CHAT_BACKBONES: Qwen2, Mistral with a window, SigLIP x Qwen2) with its
    real tokenizer and chat template."""
    if request.param == "llama":
        yield server, gen, None, None
        return
    d, _, _ = make_chat_checkpoint(tmp_path_factory.mktemp(request.param), backbone=request.param, max_positions=128)
    g = ChatGenerator.from_pretrained(d, chunk_size=4, name="tiny-llava")
    srv = _start(g, window_s=0.25, max_batch=8, max_pending=16)
    yield srv, g, d, request.param
    srv.shutdown()
    srv.server_close()


def test_completion_equals_direct_generation(backbone_server):
    """Also on the other backbones: the reply is transformers' greedy `generate` on the same
    checkpoint, ended by the template's end-of-turn token (<|im_end|>, <|eot_id|>)."""
    server, gen, d, backbone = backbone_server
    c = _client(server)
    r = c.chat.completions.create(model="tiny-llava", messages=_image_msg(STEER_QUESTION), max_tokens=12,
                                  temperature=0)
    direct = gen.chat(steer_messages(), SamplingParams(max_new_tokens=12))
    assert r.choices[0].message.content == direct.text
    assert r.choices[0].finish_reason == direct.finish_reason
    assert r.usage.prompt_tokens == direct.prompt_tokens and r.usage.completion_tokens == direct.completion_tokens
    if d is not None:
        from test_chat_templates import END

        end = gen.tokenizer.convert_tokens_to_ids(END[CHAT_BACKBONES[backbone]["tokenizer"]])
        assert gen.template == "chat_template" and end in gen.eos_ids
        ref = chat_reference(d, gen, gen.encode(steer_messages()), end, new=12)
        assert ref[-1] == end and len(ref) < 12  # it stopped at the end of turn, before the limit
        assert r.choices[0].message.content == gen.tokenizer.decode(ref, skip_special_tokens=True)
        assert r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens == len(ref) - 1  # the engine counts the reply, not its EOS


def test_streaming(server):
    c = _client(server)
    kw = dict(model="tiny-llava", messages=_image_msg("Describe the scene.", 1), max_tokens=16, temperature=0)
    full = c.chat.completions.create(**kw).choices[0].message.content
    pieces, finish, usage = [], None, None
    for chunk in c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.delta.content:
                pieces.append(ch.delta.content)
            finish = ch.finish_reason or finish
    assert "".join(pieces) == full
    assert len(pieces) > 1  # streamed in several pieces (chunks of 4 decode steps)
    assert finish in ("stop", "length") and usage.completion_tokens > 0


def test_stop_strings_and_seeds(server):
    c = _client(server)
    msgs = [{"role": "user", "content": "What color is it?"}]
    text = c.chat.completions.create(model="tiny-llava", messages=msgs, max_tokens=16, temperature=0)
    text = text.choices[0].message.content
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].strip())
    r = c.chat.completions.create(model="tiny-llava", messages=msgs, max_tokens=16, temperature=0, stop=[stop, "zzz"])
    assert r.choices[0].message.content == text[:text.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    s = [c.chat.completions.create(model="tiny-llava", messages=msgs, max_tokens=16, temperature=1.0, seed=seed)
         .choices[0].message.content for seed in (7, 7, 8)]
    assert s[0] == s[1]


@pytest.fixture(params=["continuous", "windowed"])
def any_server(request, server, gen):
    if request.param == "continuous":
        yield server
        return
    srv = _start(gen, window_s=0.25, max_batch=8, max_pending=16, continuous=False)
    yield srv
    srv.shutdown()
    srv.server_close()


def test_concurrent_requests_share_a_batch(any_server, gen):
    server = any_server
    c = _client(server)
    before = json.loads(_raw(server, "GET", "/stats")[1])
    questions = ["What is in the image?", "How many people are there?", "Describe the scene in detail.",
                 "Where is the boy standing?"]
    results = [None] * 4

    def ask(i):
        msgs = _image_msg(questions[i], i) if i % 2 == 0 else [{"role": "user", "content": questions[i]}]
        results[i] = c.chat.completions.create(model="tiny-llava", messages=msgs, max_tokens=10, temperature=0)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = json.loads(_raw(server, "GET", "/stats")[1])
    new = {k: v - before["batch_sizes"].get(k, 0) for k, v in stats["batch_sizes"].items()}
    sizes = [int(k) for k, v in new.items() if v > 0]
    print(f"\nbatch sizes served for 4 concurrent requests: {new}")
    assert max(sizes) > 1
    # batching does not change greedy results: each equals the request run alone
    for i in (1, 2):
        msgs = _image_msg(questions[i], i) if i % 2 == 0 else [{"role": "user", "content": questions[i]}]
        alone = c.chat.completions.create(model="tiny-llava", messages=msgs, max_tokens=10, temperature=0)
        assert alone.choices[0].message.content == results[i].choices[0].message.content


def test_request_joins_a_running_batch(gen):
    """Continuous batching: a request that arrives while another is generating joins its batch
    at the next chunk boundary (no waiting for it to finish) and gets the same text as alone."""
    from llava_jax.serve.generator import Completion
    from llava_jax.serve.scheduler import BatchScheduler

    sched = BatchScheduler(gen, max_batch=4, window_s=0.0, reserve_new_tokens=16)
    try:
        msgs_a = [{"role": "user", "content": [{"type": "image", "image": rand_image(0)},
                                                {"type": "text", "text": "Describe the scene in detail."}]}]
        msgs_b = [{"role": "user", "content": "What color is it?"}]
        p = SamplingParams(max_new_tokens=16)
        done = {k: threading.Event() for k in "ab"}
        b = Completion(gen.encode(msgs_b), SamplingParams(max_new_tokens=6), on_done=lambda c: done["b"].set())
        fired = []

        def on_delta(text):  # runs on the batching thread while `a` is generating
            if not fired:
                fired.append(text)
                sched.submit(b)

        a = Completion(gen.encode(msgs_a), p, on_delta=on_delta, on_done=lambda c: done["a"].set())
        sched.submit(a)
        assert done["a"].wait(120) and done["b"].wait(120)
        st = sched.stats()
        assert st["joined_running_batch"] == 1 and st["max_rows_per_step"] == 2, st
        assert a.text == gen.chat(msgs_a, p).text and a.finish_reason == "length"
        assert b.text == gen.chat(msgs_b, SamplingParams(max_new_tokens=6)).text
    finally:
        sched.close()


def test_api_key(gen):
    srv = _start(gen, api_key="sekret")
    try:
        with pytest.raises(openai.AuthenticationError):
            _client(srv, "wrong").models.list()
        assert _raw(srv, "POST", "/v1/chat/completions", {"model": "tiny-llava"})[0] == 401
        assert _raw(srv, "GET", "/health")[0] == 200  # liveness needs no key
        r = _client(srv, "sekret").chat.completions.create(
            model="tiny-llava", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        assert r.choices[0].message.role == "assistant"
    finally:
        srv.shutdown()
        srv.server_close()


def test_queue_full_gives_429(gen):
    srv = _start(gen, window_s=1.5, max_pending=1)  # the first request waits 1.5 s in the window
    try:
        body = {"model": "tiny-llava", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        first = threading.Thread(target=_raw, args=(srv, "POST", "/v1/chat/completions", body))
        first.start()
        import time

        time.sleep(0.4)
        status, data = _raw(srv, "POST", "/v1/chat/completions", body)
        assert status == 429 and json.loads(data)["error"]["code"] == "too_many_requests"
        first.join()
        assert _raw(srv, "POST", "/v1/chat/completions", body)[0] == 200  # served again once drained
    finally:
        srv.shutdown()
        srv.server_close()


# ---------------------------------------------------------------------------- bad requests
def _png_b64(w, h):
    from PIL import Image

    return base64.b64encode(png_bytes(Image.new("RGB", (w, h)))).decode()


def _img_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


def _body(**kw):
    b = {"model": "tiny-llava", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    b.update(kw)
    return b


BAD = {
    "malformed_json": (b'{"model": "tiny-llava", "messages": [', 400),
    "not_utf8": (b"\xff\xfe{}", 400),
    "json_array": ([1, 2], 400),
    "nested_too_deep": (b"[" * 100000 + b"]" * 100000, 400),
    "unknown_model": (_body(model="gpt-4o"), 404),
    "model_not_string": (_body(model=5), 400),
    "messages_missing": ({"model": "tiny-llava"}, 400),
    "messages_string": (_body(messages="hello"), 400),
    "messages_empty": (_body(messages=[]), 400),
    "role_unknown": (_body(messages=[{"role": "tool", "content": "x"}]), 400),
    "content_int": (_body(messages=[{"role": "user", "content": 5}]), 400),
    "content_empty": (_body(messages=[{"role": "user", "content": "   "}]), 400),
    "part_unknown_type": (_body(messages=[{"role": "user", "content": [{"type": "audio", "data": "x"}]}]), 400),
    "text_part_not_string": (_body(messages=[{"role": "user", "content": [{"type": "text", "text": 1}]}]), 400),
    "bad_base64": (_body(messages=[{"role": "user", "content": [_img_part("data:image/png;base64,@@@notbase64")]}]), 400),
    "not_an_image": (_body(messages=[{"role": "user", "content": [
        _img_part("data:image/png;base64," + base64.b64encode(b"hello, not a png" * 10).decode())]}]), 400),
    "truncated_image": (_body(messages=[{"role": "user", "content": [
        _img_part("data:image/png;base64," + base64.b64encode(png_bytes(rand_image(5))[:2000]).decode())]}]), 400),
    "huge_image_pixels": (_body(messages=[{"role": "user", "content": [
        _img_part("data:image/png;base64," + _png_b64(2000, 1000))]}]), 413),
    "image_extreme_aspect": (_body(messages=[{"role": "user", "content": [
        _img_part("data:image/png;base64," + _png_b64(1, 3000))]}]), 400),
    "image_too_many_bytes": (_body(messages=[{"role": "user", "content": [
        _img_part("data:image/png;base64," + "A" * 500_000)]}]), 413),
    "remote_image_url": (_body(messages=[{"role": "user", "content": [_img_part("http://example.com/cat.png")]}]), 400),
    "text_mime": (_body(messages=[{"role": "user", "content": [_img_part("data:text/plain;base64,aGVsbG8=")]}]), 400),
    "too_many_images": (_body(messages=[{"role": "user", "content": [
        _img_part("data:image/png;base64," + _png_b64(8, 8))] * 3}]), 400),
    "image_in_assistant": (_body(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": [
        _img_part("data:image/png;base64," + _png_b64(8, 8))]}, {"role": "user", "content": "b"}]), 400),
    "max_tokens_over_limit": (_body(max_tokens=100000), 400),
    "max_tokens_zero": (_body(max_tokens=0), 400),
    "max_tokens_string": (_body(max_tokens="10"), 400),
    "max_tokens_bool": (_body(max_tokens=True), 400),
    "prompt_too_long": (_body(messages=[{"role": "user", "content": "the quick brown fox " * 200}]), 400),
    "temperature_string": (_body(temperature="hot"), 400),
    "temperature_nan": (b'{"model": "tiny-llava", "messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}', 400),
    "temperature_negative": (_body(temperature=-1), 400),
    "top_p_too_big": (_body(top_p=1.5), 400),
    "stop_int": (_body(stop=5), 400),
    "stop_too_many": (_body(stop=["a", "b", "c", "d", "e"]), 400),
    "seed_float": (_body(seed=1.5), 400),
    "stream_string": (_body(stream="yes"), 400),
    "n_two": (_body(n=2), 400),
    "ends_with_assistant": (_body(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]), 400),
    "starts_with_assistant": (_body(messages=[{"role": "assistant", "content": "b"}, {"role": "user", "content": "a"}]), 400),
    "image_token_in_text": (_body(messages=[{"role": "user", "content": "look <image> here"}]), 400),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_request_gives_4xx_json(server, name):
    body, expected = BAD[name]
    status, data = _raw(server, "POST", "/v1/chat/completions", body)
    assert status == expected, data
    err = json.loads(data)["error"]
    assert isinstance(err["message"], str) and err["message"] and "type" in err


def test_bad_http_gives_4xx(server):
    assert _raw(server, "GET", "/v1/nothing")[0] == 404
    assert _raw(server, "PUT", "/v1/chat/completions", "{}")[0] == 405
    assert _raw(server, "POST", "/v1/chat/completions", "{}",
                {"Content-Length": str(10**12), "Content-Type": "application/json"})[0] == 413
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Length", "-5")
    conn.endheaders()
    assert conn.getresponse().status == 400
    conn.close()
    assert _raw(server, "GET", "/health")[0] == 200  # still alive


def test_fuzz_never_5xx(gen):
    """Random request bodies (valid and invalid mixed) never get a 5xx and always a JSON error."""
    server = _start(gen, window_s=0.0)
    hyp = pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True),
                        st.text(max_size=20))
    anything = st.recursive(scalars, lambda ch: st.one_of(st.lists(ch, max_size=3),
                                                          st.dictionaries(st.text(max_size=8), ch, max_size=3)),
                            max_leaves=8)
    good_png = "data:image/png;base64," + _png_b64(8, 8)
    urls = st.one_of(st.just(good_png), st.just("data:image/png;base64,%%%"), st.text(max_size=30),
                     st.builds(lambda b: "data:image/png;base64," + base64.b64encode(b).decode(), st.binary(max_size=64)),
                     anything)
    parts = st.one_of(
        st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(st.text(max_size=40), anything)}),
        st.fixed_dictionaries({"type": st.just("image_url"),
                               "image_url": st.one_of(st.fixed_dictionaries({"url": urls}), urls)}),
        anything)
    content = st.one_of(st.text(max_size=60), st.lists(parts, max_size=3), anything)
    message = st.one_of(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "x"]),
                                               "content": content}), anything)
    body = st.fixed_dictionaries(
        {"model": st.one_of(st.just("tiny-llava"), anything),
         "messages": st.one_of(st.lists(message, min_size=1, max_size=3), anything)},
        optional={"max_tokens": st.one_of(st.integers(-5, 40), anything),
                  "temperature": st.one_of(st.floats(-1, 3), anything),
                  "top_p": st.one_of(st.floats(-1, 2), anything), "top_k": st.one_of(st.integers(-3, 50), anything),
                  "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=6), anything),
                  "seed": st.one_of(st.integers(-2**70, 2**70), anything), "stream": st.one_of(st.booleans(), anything),
                  "n": anything, "stream_options": anything})
    # valid requests, and valid requests with one field replaced by anything or dropped
    good_part = st.one_of(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(min_size=1, max_size=30)}),
                          st.just({"type": "image_url", "image_url": {"url": good_png}}))
    valid = st.fixed_dictionaries(
        {"model": st.just("tiny-llava"),
         "messages": st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": st.one_of(
             st.text(min_size=1, max_size=40), st.lists(good_part, min_size=1, max_size=2))}), min_size=1, max_size=1),
         "max_tokens": st.integers(1, 4)},
        optional={"temperature": st.floats(0, 2), "top_p": st.floats(0, 1), "top_k": st.integers(0, 20),
                  "seed": st.integers(-2**40, 2**40), "stream": st.booleans(),
                  "stop": st.lists(st.text(min_size=1, max_size=3), max_size=4)})
    keys = ["model", "messages", "max_tokens", "temperature", "top_p", "top_k", "seed", "stream", "stop",
            "stream_options", "n"]
    mutated = st.tuples(valid, st.sampled_from(keys), st.one_of(st.just(KeyError), anything)).map(
        lambda t: {k: v for k, v in {**t[0], t[1]: t[2]}.items() if v is not KeyError})
    raw = st.one_of(valid.map(lambda b: json.dumps(b).encode()), mutated.map(lambda b: json.dumps(b).encode()),
                    body.map(lambda b: json.dumps(b).encode()), st.binary(max_size=200),
                    anything.map(lambda b: json.dumps(b).encode()))
    tried = {"n": 0, "status": {}}

    @settings(max_examples=int(os.environ.get("LLAVA_JAX_FUZZ_EXAMPLES", 300)), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(raw)
    def one(data):
        status, resp = _raw(server, "POST", "/v1/chat/completions", data)
        tried["n"] += 1
        tried["status"][status] = tried["status"].get(status, 0) + 1
        assert status < 500, resp
        if status >= 400:
            assert json.loads(resp)["error"]["message"]

    one()
    print(f"\nfuzz: {tried['n']} request bodies, status counts {tried['status']}")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "fuzz_api.json").write_text(json.dumps({**tried, "hypothesis": hyp.__version__}, indent=1))
    assert _raw(server, "GET", "/health")[0] == 200
    server.shutdown()
    server.server_close()
