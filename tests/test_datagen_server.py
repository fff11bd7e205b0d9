"""The OpenAI-compatible backend against a real HTTP server on 127.0.0.1 (tests/datagen_server.py)
that scripts 429s, 500/503s, timeouts, dropped connections, unreadable 200s, malformed and empty
replies: every item recovers (or is rejected and counted when the reply stays malformed),
nothing is duplicated, reruns cost no requests, a killed run resumes without losing anything,
and a bad key stops the run at once."""
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import SHARED
from datagen_server import ScriptedServer, prompt_hash
from llava_jax.datagen import offline
from llava_jax.datagen.annotations import load_jsonl
from llava_jax.datagen.backends import OpenAIChatBackend, Request, RequestFailed, Stats
from llava_jax.datagen.parse import make_row, parse_reply
from llava_jax.datagen.prompts import TASKS, load_prompts, render_context
from llava_jax.datagen.runner import JsonlLog, generate

REPO = Path(__file__).resolve().parents[1]
REF = SHARED / "caps_boxes_coco2014_val_80.jsonl"

# Per prompt (bucket = first 8 hex digits of its hash mod 20): what the n-th request gets.
SCRIPTS = {0: ["429", "ok"], 1: ["429", "429", "ok"], 2: ["500", "503", "ok"], 3: ["timeout", "ok"],
           4: ["bad_json", "ok"], 5: ["no_choices", "ok"], 6: ["drop", "ok"], 7: ["garbage", "ok"],
           8: ["empty", "ok"], 9: ["garbage"]}  # 9: always malformed -> rejected


def bucket(h: str) -> int:
    return int(h[:8], 16) % 20


def chaos(h: str, n: int) -> str:
    seq = SCRIPTS.get(bucket(h), ["ok"])
    return seq[min(n, len(seq) - 1)]


@pytest.fixture(scope="module")
def world():
    if not REF.exists():
        pytest.skip(f"reference annotations not found at {REF} (../shared/llava_reference is absent)")
    anns = load_jsonl(REF)
    prompts = load_prompts(TASKS)
    by_context = {render_context(a): a for a in anns}
    task_by_system = {p.system: t for t, p in prompts.items()}

    def reply(messages):
        return offline.write_reply(task_by_system[messages[0]["content"]], by_context[messages[-1]["content"]])

    hashes = {(a.id, t): prompt_hash(prompts[t].messages(render_context(a))) for a in anns for t in TASKS}
    expected = {f"{a.id}_{t}": make_row(t, a, parse_reply(t, offline.write_reply(t, a))) for a in anns for t in TASKS}
    return {"anns": anns, "prompts": prompts, "reply": reply, "hashes": hashes, "expected": expected}


def backend(server, **kw):
    # 0.6 s: far above an answer's latency on a loaded 2-core box, far below the 2 s scripted hang
    kw = {"timeout": 0.6, "max_retries": 4, "backoff": 0.01, "max_backoff": 0.05, **kw}
    return OpenAIChatBackend(server.base_url, "scripted-model", "sk-test", **kw)


def run(world, server, out, **kw):
    return generate(world["anns"], list(TASKS), kw.pop("backend", None) or backend(server), world["prompts"], out,
                    concurrency=8, parse_retries=1, progress=False, log=lambda *_: None, **kw)


def test_chaos_server_everything_recovers_nothing_duplicated(world, tmp_path):
    hashes = world["hashes"]
    buckets = Counter(bucket(h) for h in hashes.values())
    assert all(buckets[b] > 0 for b in SCRIPTS), buckets  # every failure mode is exercised
    always_bad = {f"{i}_{t}" for (i, t), h in hashes.items() if bucket(h) == 9}
    with ScriptedServer(world["reply"], chaos, hang=2.0) as server:
        s = run(world, server, tmp_path / "out")
        assert s["failed"] == 0 and s["not_started"] == 0
        assert s["rejected"] == len(always_bad) and s["rejected_by_reason"] == {"malformed": len(always_bad)}
        assert s["generated"] == 240 - len(always_bad)
        for cause in ("http_429", "http_500", "http_503", "timeout", "bad_reply", "connection"):
            assert s["retries_by_cause"].get(cause, 0) > 0, (cause, s["retries_by_cause"])
        assert s["retries_by_cause"]["http_429"] == buckets[0] + 2 * buckets[1]
        assert s["requests"] == sum(server.requests.values())
        assert s["tokens"]["total_tokens"] == server.tokens > 0
        # every good prompt was answered "ok" exactly once: no request repeated after success
        good = [h for (i, t), h in hashes.items() if f"{i}_{t}" not in always_bad]
        assert all(server.served[h] == 1 for h in good)
        assert server.auth == {"Bearer sk-test"}

    rows = json.loads((tmp_path / "out" / "llava_instruct.json").read_text())
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 240 - len(always_bad)
    assert not set(ids) & always_bad  # rejected: never written
    for r in rows:  # each row carries its own image's reply (no mix-ups under concurrency)
        assert r == world["expected"][r["id"]]
    keys = [rec["key"] for rec in JsonlLog(tmp_path / "out" / "results.jsonl").read()]
    assert len(keys) == len(set(keys)) == 240
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["generated"] == s["generated"]

    # A rerun skips everything; without results.jsonl, everything comes from the cache.
    before = (tmp_path / "out" / "llava_instruct.json").read_bytes()
    with ScriptedServer(world["reply"], chaos) as server:
        s2 = run(world, server, tmp_path / "out")
        assert (s2["already_done"], s2["requests"], sum(server.requests.values())) == (240, 0, 0)
        (tmp_path / "out" / "results.jsonl").unlink()
        s3 = run(world, server, tmp_path / "out")
        assert (s3["requests"], s3["generated"], s3["rejected"]) == (0, s["generated"], s["rejected"])
        assert s3["cache_hits"] >= 240
    assert (tmp_path / "out" / "llava_instruct.json").read_bytes() == before

    # --retry-rejected asks again with new requests (not the cached bad replies); now they succeed
    with ScriptedServer(world["reply"], lambda h, n: "ok") as server:
        s4 = run(world, server, tmp_path / "out", retry_rejected=True)
        assert s4["already_done"] == 240 - len(always_bad) and s4["generated"] == len(always_bad)
        assert s4["requests"] == len(always_bad)
    rows = json.loads((tmp_path / "out" / "llava_instruct.json").read_text())
    assert len(rows) == 240 and all(r == world["expected"][r["id"]] for r in rows)


def test_failed_items_are_not_recorded_and_a_rerun_completes_them(world, tmp_path):
    dead = {h for h in world["hashes"].values() if bucket(h) in (2, 3)}
    with ScriptedServer(world["reply"], lambda h, n: "503" if h in dead else "ok") as server:
        s = run(world, server, tmp_path / "o", backend=backend(server, max_retries=2))
        assert s["failed"] == len(dead) and s["failed_by_cause"] == {"http_503": len(dead)}
        assert s["generated"] == 240 - len(dead)
        assert all(server.requests[h] == 3 for h in dead)  # 1 + max_retries
    with ScriptedServer(world["reply"], lambda h, n: "ok") as server:
        s = run(world, server, tmp_path / "o")
        assert (s["already_done"], s["generated"], s["requests"]) == (240 - len(dead), len(dead), len(dead))
    assert len(json.loads((tmp_path / "o" / "llava_instruct.json").read_text())) == 240


def test_backoff_delays_and_retry_after():
    sleeps = []
    with ScriptedServer(lambda m: "x", lambda h, n: "500" if n < 4 else "ok") as server:
        b = OpenAIChatBackend(server.base_url, "m", backoff=0.1, max_backoff=0.25, max_retries=6,
                              sleep=sleeps.append)
        stats = Stats()
        comp = b.complete(Request("detail", None, [{"role": "user", "content": "hi"}]), stats)
        assert comp.text == "x" and stats.requests == 5 and stats.retries == {"http_500": 4}
    bounds = [(0.05, 0.1), (0.1, 0.2), (0.125, 0.25), (0.125, 0.25)]  # base * 2^k * U(0.5, 1), capped
    assert len(sleeps) == 4 and all(lo <= d <= hi for d, (lo, hi) in zip(sleeps, bounds)), sleeps
    sleeps.clear()
    with ScriptedServer(lambda m: "x", lambda h, n: "429" if n < 2 else "ok") as server:
        b = OpenAIChatBackend(server.base_url, "m", backoff=5.0, sleep=sleeps.append)
        b.complete(Request("detail", None, [{"role": "user", "content": "hi"}]), Stats())
    assert sleeps == [0.0, 0.0]  # Retry-After: 0 wins over the 5 s backoff
    with ScriptedServer(lambda m: "x", lambda h, n: "500") as server:
        b = OpenAIChatBackend(server.base_url, "m", max_retries=1, sleep=lambda s: None)
        with pytest.raises(RequestFailed, match="after 2 attempts"):
            b.complete(Request("detail", None, [{"role": "user", "content": "hi"}]), Stats())


def cli(out, base_url, *extra):
    return [sys.executable, "-m", "llava_jax.datagen", "--annotations", str(REF), "--out", str(out),
            "--base-url", base_url, "--model", "scripted-model", "--timeout", "10", "--backoff", "0.01",
            "--max-backoff", "0.05", "--no-progress", *extra]


def env():
    e = dict(os.environ)
    e["OPENAI_API_KEY"] = "sk-test"
    e["JAX_PLATFORMS"] = "cpu"
    return e


def test_kill_and_resume_loses_nothing(world, tmp_path):
    out = tmp_path / "out"
    flaky = lambda h, n: "429" if bucket(h) == 0 and n == 0 else "ok"  # noqa: E731
    with ScriptedServer(world["reply"], flaky, delay=0.04) as server:
        args = cli(out, server.base_url, "--concurrency", "4")
        proc = subprocess.Popen(args, env=env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        results = out / "results.jsonl"
        t0 = time.time()
        while time.time() - t0 < 120:
            if results.exists() and results.read_bytes().count(b"\n") >= 60:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done_at_kill = len(JsonlLog(results).read())
        assert 60 <= done_at_kill < 240
        p = subprocess.run(args, env=env(), cwd=REPO, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:] + p.stdout[-3000:]
        assert f"{done_at_kill} already done" in p.stdout
        # only the items in flight at the kill (at most 2 x concurrency) were asked twice
        assert 240 <= sum(server.served.values()) <= 240 + 8
    rows = json.loads((out / "llava_instruct.json").read_text())
    assert [r["id"] for r in rows] == list(world["expected"])  # all of them, in order, once
    assert all(r == world["expected"][r["id"]] for r in rows)
    keys = [rec["key"] for rec in JsonlLog(out / "results.jsonl").read()]
    assert len(keys) == len(set(keys)) == 240


def test_bad_key_stops_at_once(world, tmp_path):
    with ScriptedServer(world["reply"], lambda h, n: "401") as server:
        p = subprocess.run(cli(tmp_path / "o", server.base_url, "--concurrency", "2"), env=env(), cwd=REPO,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2
        assert "HTTP 401" in p.stdout and "API key" in p.stdout
        assert sum(server.requests.values()) <= 4  # no retries, no further items
    assert json.loads((tmp_path / "o" / "llava_instruct.json").read_text()) == []
    with ScriptedServer(world["reply"], lambda h, n: "ok") as server:
        p = subprocess.run(cli(tmp_path / "o2", server.base_url[:-3] + "/wrong"), env=env(), cwd=REPO,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and "Check --base-url" in p.stdout


def test_backend_speaks_through_the_openai_sdk():
    """The request on the wire is the official client's, with exactly body(req) as JSON (the
    --extra-body fields merged over the others); no key: the placeholder "EMPTY"; a 429 is retried
    after its Retry-After, 401 stops everything, another 4xx fails only the item."""
    from judge_server import ScriptedJudge

    from llava_jax.datagen.backends import FatalBackendError

    state = {"n": 0}

    def reply(body):
        state["n"] += 1
        return (429, "slow down") if state["n"] == 1 else "hello"

    req = Request("detail", None, [{"role": "user", "content": "hi"}])
    sleeps = []
    with ScriptedJudge(reply) as server:
        b = OpenAIChatBackend(server.url, "m", None, temperature=0.5, top_p=0.9, backoff=5.0, sleep=sleeps.append,
                              extra_body={"seed": 7, "temperature": 0.0, "max_completion_tokens": 9})
        stats = Stats()
        comp = b.complete(req, stats)
        assert (comp.text, comp.finish_reason) == ("hello", "stop")
        assert stats.requests == 2 and stats.retries == {"http_429": 1} and sleeps == [0.0]
        assert server.requests[-1] == b.body(req) == {"model": "m", "messages": req.messages, "temperature": 0.0,
                                                      "max_tokens": 1024, "top_p": 0.9, "seed": 7,
                                                      "max_completion_tokens": 9}
        assert server.headers[-1]["User-Agent"].startswith("OpenAI/Python")
        assert server.headers[-1]["Authorization"] == "Bearer EMPTY"
    with ScriptedJudge(lambda body: (401, "bad key")) as server:
        with pytest.raises(FatalBackendError, match="HTTP 401: .*bad key.*API key"):
            OpenAIChatBackend(server.url, "m", "sk-x", sleep=lambda s: None).complete(req, Stats())
        assert len(server.requests) == 1 and server.headers[0]["Authorization"] == "Bearer sk-x"
    with ScriptedJudge(lambda body: (400, "context too long")) as server:
        with pytest.raises(RequestFailed, match="HTTP 400: .*context too long") as e:
            OpenAIChatBackend(server.url, "m", sleep=lambda s: None).complete(req, Stats())
        assert e.value.cause == "http_400" and len(server.requests) == 1
