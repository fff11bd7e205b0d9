"""Hostile traffic against the HTTP server: figures for issue 18 (BENCHMARKS.md).

    python -m llava_jax.tools.serve_fuzz --requests 2000 --rounds 2 --concurrency 32

Starts two servers in this process on 127.0.0.1, each on a tiny random-weight LLaVA (built
here: no checkpoint, no download; or `--model DIR` for both): one open (its Host check active),
one with an API key. Client threads then send `--requests` requests drawn at random from mixed
cases over raw sockets: valid chats (text, image, streaming), bad JSON, fields of the wrong type,
huge fields, bad base64 and images, wrong Host / API key / content type, bad framing (chunked,
Content-Length), unknown routes and methods, malformed HTTP, pipelined requests, clients that
hang up mid-body or mid-generation, stalled uploads and stalled request heads.

Each case has the replies it may get (e.g. a valid chat: 200 or 429 when the queue is full). It
prints requests sent, counts per status class and code, connection resets, replies outside their
case's set, the servers' batching counters and the process's peak RSS (VmHWM: servers, models and
client threads together); then checks that a valid request gets the same answer as before.
Exit status 1 on any 5xx, reset or unexpected reply.
"""
from __future__ import annotations

import argparse
import base64
import collections
import io
import json
import random
import re
import socket
import struct
import tempfile
import threading
import time
import zlib
from pathlib import Path

URL = "/v1/chat/completions"
MODEL = "tiny-llava"
API_KEY = "fuzz-key"


# ---------------------------------------------------------------------------- a tiny model
def tiny_generator(workdir: str, seed: int = 0):
    """A random-weight LLaVA (2-layer CLIP 28 px, 2-layer LLaMA, 48 wide) with a small offline
    LLaMA-style tokenizer: the whole server path at a fraction of a second per request."""
    from flax import nnx

    from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
    from llava_jax.models.llava import LlavaModel
    from llava_jax.serve.engine import Engine
    from llava_jax.serve.generator import ChatGenerator
    from llava_jax.tools.data_bench import build_tokenizer

    tok = build_tokenizer(workdir)
    cfg = LlavaConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, image_size=28,
                            patch_size=14),
        text=TextConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=12, max_position_embeddings=256, pad_token_id=tok.pad_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"))
    model = LlavaModel(cfg, rngs=nnx.Rngs(seed))
    return ChatGenerator(model, tok, template="vicuna_v1", engine=Engine(model, chunk_size=4), name=MODEL)


def peak_rss_mib() -> tuple[float, float]:
    """(VmHWM, VmRSS) of this process in MiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmHWM", "VmRSS"))


# ---------------------------------------------------------------------------- requests
def png(w: int, h: int, seed: int = 0) -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def png_claiming(w: int, h: int) -> bytes:
    """A valid small PNG whose header says w x h (a decompression bomb's header)."""
    data = bytearray(png(8, 8))
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


WORDS = "the a red blue circle square image picture left right small large how many what color is there".split()
WRONG = [None, True, False, 0, -1, 2**31, 2**64, -2**70, 1.5, 1e308, "", "x" * 50, "10", [], [1, "a"], {}, {"a": 1},
         [[[]]], "\ud800"]


class Cases:
    """Request makers: each returns (target, bytes to send, how to end, replies allowed). target:
    "open" or "keyed" server; how: ("read",) (read the replies until the server closes), or
    ("hangup", delay, abortive) (close `delay` s after sending, with RST when `abortive`)."""

    def __init__(self, rng: random.Random, ports: dict, images: list[str]):
        self.rng, self.ports, self.images = rng, ports, images
        self.weights = {
            "valid_text": 12, "valid_image": 6, "valid_stream": 6, "bad_json": 6, "wrong_type": 10,
            "huge_field": 3, "bad_image": 6, "wrong_host": 3, "wrong_key": 3, "wrong_content_type": 3,
            "framing": 4, "route_method": 5, "malformed_http": 4, "pipelined": 3, "hangup_mid_body": 3,
            "hangup_after_request": 4, "stalled_upload": 1, "stalled_head": 1,
        }

    def draw_valid(self):
        name = self.rng.choice(["valid_text", "valid_image", "valid_stream"])
        return (name, *getattr(self, name)())

    def draw(self):
        names = list(self.weights)
        name = self.rng.choices(names, [self.weights[n] for n in names])[0]
        return (name, *getattr(self, name)())

    # ------------------------------------------------------------------ pieces
    def head(self, method="POST", path=URL, target="open", headers=None, length=None, host=None, close=True) -> bytes:
        h = {"Host": f"127.0.0.1:{self.ports[target]}" if host is None else host, "Content-Type": "application/json"}
        if target == "keyed":
            h["Authorization"] = f"Bearer {API_KEY}"
        if length is not None:
            h["Content-Length"] = str(length)
        if close:
            h["Connection"] = "close"
        h.update(headers or {})
        lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in h.items() if v is not None]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def post(self, body, target="open", **kw) -> bytes:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.head(target=target, length=len(data), **kw) + data

    def text(self, n=None):
        return " ".join(self.rng.choice(WORDS) for _ in range(n or self.rng.randint(1, 12)))

    def chat(self, **kw) -> dict:
        r = self.rng
        content = self.text()
        if kw.pop("image", False):
            content = [{"type": "image_url", "image_url": {"url": r.choice(self.images)}}, {"type": "text", "text": content}]
        body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": r.randint(1, 8),
                "temperature": r.choice([0, 0.7, 1.0])}
        if r.random() < 0.3:
            body["seed"] = r.randint(0, 2**32)
        body.update(kw)
        return body

    # ------------------------------------------------------------------ cases
    def valid_text(self):
        target = "keyed" if self.rng.random() < 0.2 else "open"
        return target, self.post(self.chat(), target), ("read",), {200, 429}

    def valid_image(self):
        return "open", self.post(self.chat(image=True)), ("read",), {200, 429}

    def valid_stream(self):
        so = {"include_usage": True} if self.rng.random() < 0.5 else None
        return "open", self.post(self.chat(stream=True, stream_options=so, image=self.rng.random() < 0.3)), ("read",), \
            {200, 429}

    def bad_json(self):
        r = self.rng
        good = json.dumps(self.chat()).encode()
        data = r.choice([good[:r.randint(1, len(good) - 1)], bytes(r.getrandbits(8) for _ in range(r.randint(1, 64))),
                         good.replace(b"0", b"NaN", 1) + b"x", b"[" * 50_000 + b"]" * 50_000, b"", b"\xff\xfe{}",
                         b'{"model": "tiny-llava", "messages": [{"role": "user", "content": "\\ud800"}]}'])
        return "open", self.post(data), ("read",), {400, 429}

    def wrong_type(self):
        r = self.rng
        body = self.chat()
        key = r.choice(["model", "messages", "max_tokens", "temperature", "top_p", "top_k", "seed", "stream", "stop",
                        "n", "stream_options", "logprobs", "max_completion_tokens", "presence_penalty", "messages.0",
                        "messages.0.role", "messages.0.content"])
        value = r.choice(WRONG)
        if key.startswith("messages."):
            path = key.split(".")
            if len(path) == 2:
                body["messages"][0] = value
            else:
                body["messages"][0][path[2]] = value
        else:
            body[key] = value
        # some replacements are valid values (temperature 0, stop "", seed 1.5e0 is not...)
        return "open", self.post(body), ("read",), {200, 400, 404, 413, 429}

    def huge_field(self):
        r = self.rng
        kind = r.randrange(4)
        if kind == 0:
            body = self.chat()
            body["messages"][0]["content"] = "word " * 300_000  # 1.5 MB of text: refused before tokenizing
        elif kind == 1:
            body = self.chat(stop=["s"] * 10_000)
        elif kind == 2:
            body = self.chat()
            body["messages"] = [{"role": "user", "content": "hi"}] * 20_000
        else:
            body = self.chat()
            body["messages"][0]["content"] = "x" * 3_000_000  # over the body limit: 413 on the headers
            data = json.dumps(body).encode()
            return "open", self.head(length=len(data)), ("read",), {413}  # the body is never sent
        return "open", self.post(body), ("read",), {400, 413, 429}

    def bad_image(self):
        r = self.rng
        url = r.choice([
            "data:image/png;base64,@@@notbase64", data_url(b"not an image" * 20), data_url(png(40, 30)[:300]),
            data_url(png_claiming(20000, 20000)), data_url(png_claiming(2000, 1)), "http://example.com/cat.png",
            data_url(b"hello", "text/plain"), "data:image/png;base64", data_url(b""), "data:image/png," + "A" * 100,
            data_url(b"\x89PNG\r\n\x1a\n" + bytes(r.getrandbits(8) for _ in range(200))),
            "data:image/png;base64," + "A" * 1_500_000,  # over max_image_bytes
        ])
        body = self.chat()
        body["messages"][0]["content"] = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]
        return "open", self.post(body), ("read",), {400, 413, 429}

    def wrong_host(self):
        host = self.rng.choice(["evil.example:{p}", "localhost.evil.example:{p}", "127.0.0.1", "localhost:1", "",
                                "[::1]:0", "x" * 300]).format(p=self.ports["open"])
        return "open", self.post(self.chat(), host=host), ("read",), {403}

    def wrong_key(self):
        key = self.rng.choice([None, "Bearer wrong", "Bearer", "Basic Zm9vOmJhcg==", f"bearer {API_KEY}", "Bearer " + "k" * 500])
        return "keyed", self.post(self.chat(), "keyed", headers={"Authorization": key}), ("read",), {401}

    def wrong_content_type(self):
        ctype = self.rng.choice([None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x",
                                 "application/jsonp", "json"])
        return "open", self.post(self.chat(), headers={"Content-Type": ctype}), ("read",), {415}

    def framing(self):
        r = self.rng
        data = json.dumps(self.chat()).encode()
        kind = r.randrange(4)
        if kind == 0:
            chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)
            return "open", self.head(headers={"Transfer-Encoding": "chunked"}) + chunked, ("read",), {411}
        if kind == 1:
            return "open", self.head(headers={"Content-Length": r.choice(["abc", "-5", "1e3", "0x10", "5, 6"])}) + data, \
                ("read",), {400}
        if kind == 2:
            return "open", self.head(length=10**12), ("read",), {413}
        return "open", self.head(length=len(data) + 10) + data + b"}" * 10, ("read",), {400, 429}  # trailing junk

    def route_method(self):
        r = self.rng
        method, path, allowed = r.choice([
            ("GET", "/nothing", {404}), ("POST", "/v1/completions", {404}), ("PUT", URL, {405}), ("DELETE", "/", {405}),
            ("PATCH", "/v1/models", {405}), ("FOO", "/", {405}), ("OPTIONS", URL, {204}), ("HEAD", "/", {200}),
            ("GET", "/v1/models", {200}), ("GET", "/v1/models/nope", {404}), ("GET", "/stats", {200}),
            ("GET", URL, {404}), ("GET", "/health", {200}), ("GET", "/%2e%2e/%2e%2e/etc/passwd", {404}),
            ("GET", "/" + "a" * 4000, {404}),
        ])
        return "open", self.head(method, path, length=0), ("read",), allowed

    def malformed_http(self):
        r = self.rng
        port = self.ports["open"]
        data, allowed = r.choice([
            (b"GARBAGE\r\n\r\n", {400}), (b"\x00\x01\x02\x03\r\n\r\n", {400}),
            (b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nNo colon here\r\n\r\n" % port, {400}),
            (b"GET /\xff\xfe HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % port, {400}),
            (b"GET / HTTP/1.1\r\n\r\n", {400}),  # HTTP/1.1 without Host
            (b"POST / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello" % port,
             {400}),
            (bytes(r.getrandbits(8) for _ in range(200)) + b"\r\n\r\n", {400}),
            # accepted by h11: an unknown HTTP version; a 70 kB header that arrives in one read (one
            # arriving in pieces is refused past 16 kB); HTTP/1.0 without Host (no web page sends that)
            (b"GET / HTTP/9.9\r\nHost: 127.0.0.1:%d\r\n\r\n" % port, {200}),
            (b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nX: %s\r\nConnection: close\r\n\r\n" % (port, b"y" * 70_000),
             {200, 400}),
            (b"GET /health HTTP/1.0\r\n\r\n", {200}),
        ])
        return "open", data, ("read",), allowed

    def pipelined(self):
        first = self.head("GET", "/health", close=False)
        return "open", first + self.post(self.chat()), ("read",), {200, 429}

    def hangup(self, delay: float = 0.0):
        return ("hangup", delay, self.rng.random() < 0.3)  # 30%: an abortive close (RST)

    def hangup_mid_body(self):
        data = self.post(self.chat(image=True))
        return "open", data[:self.rng.randint(len(data) // 3, len(data) - 1)], self.hangup(), None

    def hangup_after_request(self):
        data = self.post(self.chat(stream=self.rng.random() < 0.5, max_tokens=8))
        return "open", data, self.hangup(self.rng.choice([0, 0.05, 0.2])), None  # queued, generating, or done

    def stalled_upload(self):
        data = self.post(self.chat())
        return "open", data[:len(data) - 5], ("read",), {408}  # the rest never comes

    def stalled_head(self):
        return "open", self.head()[:-10], ("read",), {"closed"}  # nor the end of the headers


# ---------------------------------------------------------------------------- the client
def parse_replies(reply: bytes) -> list:
    """The statuses of the HTTP responses in `reply` (a stream that does not end with
    `data: [DONE]` counts as "bad_stream"), or ["closed"] when there is none."""
    out = []
    while reply:
        head, sep, rest = reply.partition(b"\r\n\r\n")
        m = re.match(rb"HTTP/1\.1 (\d{3}) ", head)
        if not m or not sep:
            out.append("garbled")
            break
        status, headers = int(m.group(1)), head.lower()
        if b"transfer-encoding: chunked" in headers:
            body = b""
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line or b"0", 16)
                body, rest = body + rest[:size], rest[size + 2:]
                if size == 0:
                    break
            if status == 200 and b"text/event-stream" in headers and not body.endswith(b"data: [DONE]\n\n"):
                status = "bad_stream"
        else:
            n = re.search(rb"content-length: (\d+)", headers)
            rest = rest[int(n.group(1)) if n else 0:]  # (a HEAD reply has none of its Content-Length)
        out.append(status)
        reply = rest
    return out or ["closed"]


def send_one(port: int, data: bytes, how, timeout: float = 120.0) -> list:
    """Send `data` on a new connection; the statuses of the replies read until the server
    closes it (["closed"]: closed with no reply), or ["hangup"] / ["reset"] / ["timeout"]."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(data)
            if how[0] == "hangup":
                _, delay, abortive = how
                time.sleep(delay)
                if abortive:  # RST rather than FIN
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return ["hangup"]
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
    except (ConnectionResetError, BrokenPipeError):
        return ["reset"]
    except TimeoutError:
        return ["timeout"]
    return parse_replies(reply)


def run_clients(plan: list, ports: dict, concurrency: int) -> list:
    """Send every request of `plan` from `concurrency` threads; their results, in order."""
    results: list = [None] * len(plan)
    next_i, lock = [0], threading.Lock()

    def worker():
        while True:
            with lock:
                i = next_i[0]
                if i >= len(plan):
                    return
                next_i[0] += 1
            _name, target, data, how, _allowed = plan[i]
            results[i] = send_one(ports[target], data, how)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a llava-hf directory (default: a tiny random model built here)")
    ap.add_argument("--requests", type=int, default=2000, help="requests per round")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=32, help="client threads")
    ap.add_argument("--max-pending", type=int, default=32, help="each server's queue limit (beyond it: 429)")
    ap.add_argument("--warm-requests", type=int, default=300,
                    help="valid requests sent (not counted) before the fuzz, to compile what they need")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the figures here as JSON")
    args = ap.parse_args(argv)

    import logging

    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("uvicorn.error").setLevel(logging.ERROR)  # it warns once per malformed request
    from llava_jax.serve.generator import ChatGenerator
    from llava_jax.serve.server import Limits, make_server, serve_in_thread

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            gens = [ChatGenerator.from_pretrained(args.model, chunk_size=4, name=MODEL) for _ in range(2)]
        else:
            gens = [tiny_generator(tmp, seed) for seed in (0, 1)]
    limits = Limits(max_tokens=16, default_max_tokens=4, max_body_bytes=2 * 2**20, max_image_bytes=2**20,
                    max_image_pixels=1_000_000, body_timeout_s=1.0, header_timeout_s=1.0)
    kw = {"limits": limits, "max_batch": 4, "window_s": 0.005, "max_pending": args.max_pending}
    servers = {"open": make_server(gens[0], "127.0.0.1", 0, **kw),
               "keyed": make_server(gens[1], "127.0.0.1", 0, api_key=API_KEY, **kw)}
    from llava_jax.serve.__main__ import warmup_groups

    for srv in servers.values():  # compile what the valid requests will need, as --warmup does
        srv.app.scheduler.warm_up(warmup_groups(srv.app.generator, 4, srv.app.max_prompt_tokens), 8)
        serve_in_thread(srv)
    ports = {k: s.server_address[1] for k, s in servers.items()}
    images = [data_url(png(w, h, i)) for i, (w, h) in enumerate([(28, 28), (40, 30), (17, 60), (300, 200)])]
    rng = random.Random(args.seed)
    cases = Cases(rng, ports, images)

    reference = cases.post({"model": MODEL, "messages": [{"role": "user", "content": "What color is the circle?"}],
                            "max_tokens": 8, "temperature": 0})

    def ask(data):
        with socket.create_connection(("127.0.0.1", ports["open"]), timeout=300) as s:
            s.sendall(data)
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        return reply.split(b"\r\n\r\n", 1)

    head, ref_body = ask(reference)
    assert head.startswith(b"HTTP/1.1 200"), head
    # valid requests from concurrent clients compile what warm_up does not (requests joining a
    # running batch), so that the fuzz meets a server in its steady state
    warm = [cases.draw_valid() for _ in range(args.warm_requests)]
    run_clients(warm, ports, args.concurrency)
    setup_s = time.perf_counter() - t_start
    hwm_before, _ = peak_rss_mib()
    traces_before = {k: dict(s.app.generator.engine.traces) for k, s in servers.items()}

    counters = ("requests_completed", "requests_cancelled", "requests_rejected", "request_errors", "batches")
    stats_before = {k: s.app.scheduler.stats() for k, s in servers.items()}
    plan, results, rss_per_round, wall = [], [], [], 0.0
    for _ in range(args.rounds):  # the same mix again: RSS after each round shows growth, if any
        round_plan = [cases.draw() for _ in range(args.requests)]
        t0 = time.perf_counter()
        results += run_clients(round_plan, ports, args.concurrency)
        wall += time.perf_counter() - t0
        plan += round_plan
        rss_per_round.append(round(peak_rss_mib()[1], 1))

    codes, classes, by_case, unexpected = collections.Counter(), collections.Counter(), {}, collections.Counter()
    for (name, target, data, how, allowed), got in zip(plan, results):
        by_case.setdefault(name, collections.Counter()).update(map(str, got))
        for g in got:
            codes[str(g)] += 1
            classes[f"{str(g)[0]}xx" if isinstance(g, int) else g] += 1
        if how[0] == "hangup":
            continue
        final = got[-1]
        if final not in allowed or any(isinstance(g, int) and g >= 500 for g in got):
            unexpected[f"{name}: {got}"] += 1

    head, body_after = ask(reference)
    same = head.startswith(b"HTTP/1.1 200") and json.loads(body_after)["choices"] == json.loads(ref_body)["choices"]
    hwm, rss = peak_rss_mib()
    stats = {k: s.app.scheduler.stats() for k, s in servers.items()}
    compiled = {k: {kind: n - traces_before[k].get(kind, 0) for kind, n in s.app.generator.engine.traces.items()
                    if n > traces_before[k].get(kind, 0)} for k, s in servers.items()}
    for srv in servers.values():
        srv.shutdown()
        srv.server_close()

    replies = sum(v for k, v in codes.items() if k.isdigit())
    figures = {
        "requests": len(plan), "connections": len(plan), "replies": replies, "concurrency": args.concurrency,
        "seconds": round(wall, 1), "requests_per_s": round(len(plan) / wall, 1), "setup_s": round(setup_s, 1),
        "status_classes": dict(sorted(classes.items())), "status_codes": dict(sorted(codes.items())),
        "resets": codes.get("reset", 0), "timeouts": codes.get("timeout", 0), "unexpected": dict(unexpected),
        "cases": {k: dict(sorted(v.items())) for k, v in sorted(by_case.items())},
        "server": {k: {**{f: st[f] - stats_before[k][f] for f in counters}, "queued": st["queued"],
                       "running": st["running"]} for k, st in stats.items()},  # during the fuzz
        "compilations_during_fuzz": compiled,
        "peak_rss_mib": round(hwm, 1), "peak_rss_mib_before_fuzz": round(hwm_before, 1), "rss_mib_after": round(rss, 1),
        "rss_mib_after_each_round": rss_per_round,
        "same_answer_after": same,
    }
    print(f"{len(plan)} requests ({replies} replies) from {args.concurrency} clients in {wall:.1f}s "
          f"({len(plan) / wall:.1f}/s; setup {setup_s:.0f}s)")
    print("status classes:", figures["status_classes"])
    print("status codes:  ", figures["status_codes"])
    print(f"resets: {figures['resets']}, timeouts: {figures['timeouts']}, unexpected: {sum(unexpected.values())}"
          + (f" {dict(unexpected)}" if unexpected else ""))
    for k, v in figures["cases"].items():
        print(f"  {k:22s} {v}")
    print("server counters:", json.dumps(figures["server"]), "compilations during the fuzz:", compiled)
    print(f"peak RSS (VmHWM, whole process): {hwm:.0f} MiB (before the fuzz {hwm_before:.0f} MiB); RSS after each "
          f"round {rss_per_round} MiB")
    print(f"after the fuzz a valid request gets the same answer as before: {same}")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1))
    bad = classes.get("5xx", 0) or figures["resets"] or figures["timeouts"] or unexpected or not same
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
