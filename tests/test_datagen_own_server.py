"""The datagen CLI against this project's own OpenAI-compatible server (`llava_jax.serve`) on
127.0.0.1, serving a tiny random-weight checkpoint. The model writes gibberish, so the test checks
the protocol, not the content: every item got exactly one real completion from our server, every
reply went through validation (written or rejected with a reason), the output files are there
and hold valid LLaVA rows, and a rerun sends no request at all."""
import http.client
import json

import pytest

pytest.importorskip("torch")

from conftest import SHARED  # noqa: E402
from serve_util import make_chat_checkpoint  # noqa: E402

from llava_jax.datagen.__main__ import main  # noqa: E402
from llava_jax.datagen.parse import IMAGE_TOKEN, REJECT_REASONS  # noqa: E402
from llava_jax.datagen.prompts import TASKS  # noqa: E402
from llava_jax.serve.generator import ChatGenerator  # noqa: E402
from llava_jax.serve.server import make_server, serve_in_thread  # noqa: E402

REF = SHARED / "caps_boxes_coco2014_val_80.jsonl"
N_IMAGES = 3
MODEL = "tiny-llava"


def _stats(srv) -> dict:
    host, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", "/stats")
    r = conn.getresponse()
    body = r.read()
    conn.close()
    assert r.status == 200, body
    return json.loads(body)


def _check_row(row: dict, images: dict) -> None:
    assert set(row) == {"id", "image", "conversations"}, row
    ann_id, task = row["id"].rsplit("_", 1)
    assert task in TASKS and row["image"] == images[ann_id]
    conv = row["conversations"]
    assert conv and len(conv) % 2 == 0
    assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
    assert all(isinstance(t["value"], str) and t["value"].strip() for t in conv)
    assert conv[0]["value"].count(IMAGE_TOKEN) == 1
    assert sum(t["value"].count(IMAGE_TOKEN) for t in conv) == 1


def test_datagen_cli_against_own_server(tmp_path, capsys):
    if not REF.exists():
        pytest.skip(f"reference annotations not found at {REF} (../shared/llava_reference is absent)")
    rows_in = [json.loads(line) for line in REF.read_text().splitlines() if line.strip()][:N_IMAGES]
    ann_file = tmp_path / "anns.jsonl"
    ann_file.write_text("".join(json.dumps(r) + "\n" for r in rows_in))
    images = {str(r["id"]): r["image"] for r in rows_in}

    # the datagen prompts (system + in-context examples) are ~3k tokens with the test tokenizer
    ckpt, _, _ = make_chat_checkpoint(tmp_path / "ckpt", max_positions=4096)
    gen = ChatGenerator.from_pretrained(ckpt, chunk_size=8, name=MODEL)
    srv = make_server(gen, "127.0.0.1", 0, window_s=0.25, max_batch=4, max_pending=16)
    serve_in_thread(srv)
    try:
        host, port = srv.server_address[:2]
        out = tmp_path / "out"
        argv = ["--annotations", str(ann_file), "--types", "conversation,detail,complex", "--out", str(out),
                "--base-url", f"http://{host}:{port}/v1", "--model", MODEL, "--api-key-env", "DATAGEN_NO_KEY",
                "--max-tokens", "12", "--temperature", "0", "--concurrency", "3", "--parse-retries", "0",
                "--max-retries", "0", "--timeout", "120", "--no-progress"]
        items = N_IMAGES * len(TASKS)

        rc = main(argv)
        s = json.loads((out / "summary.json").read_text())
        assert rc == 0, (rc, s, capsys.readouterr())
        assert s["fatal"] is None and s["failed"] == 0 and s["not_started"] == 0 and s["retries"] == 0, s
        assert s["items"] == items and s["already_done"] == 0 and s["cache_hits"] == 0
        # one real HTTP completion per item, all answered by our server
        assert s["requests"] == items
        assert _stats(srv)["requests_completed"] == items
        assert s["tokens"]["prompt_tokens"] > items * 1000 and s["tokens"]["completion_tokens"] > 0
        assert s["tokens"]["total_tokens"] == s["tokens"]["prompt_tokens"] + s["tokens"]["completion_tokens"]
        # every reply was validated: written or rejected with a known reason
        assert s["generated"] + s["rejected"] == items
        assert sum(s["rejected_by_reason"].values()) == s["rejected"]
        assert set(s["rejected_by_reason"]) <= set(REJECT_REASONS)
        assert s["rows_written"]["llava_instruct.json"] == s["generated"]
        assert sum(s["rows_written"][f"{t}.json"] for t in TASKS) == s["generated"]

        results = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines() if x.strip()]
        assert sorted(r["key"] for r in results) == sorted(f"{i}/{t}" for i in images for t in TASKS)
        for r in results:
            assert r["status"] in ("ok", "rejected")
            if r["status"] == "rejected":
                assert r["reason"] in REJECT_REASONS and isinstance(r["text"], str)
        cache = [json.loads(x) for x in (out / "cache.jsonl").read_text().splitlines() if x.strip()]
        assert len(cache) == items and len({c["key"] for c in cache}) == items
        assert all(c["completion"]["finish_reason"] in ("stop", "length") for c in cache)

        written = []
        for t in TASKS:
            rows = json.loads((out / f"{t}.json").read_text())
            assert all(r["id"].endswith(f"_{t}") for r in rows)
            written += rows
        combined = json.loads((out / "llava_instruct.json").read_text())
        assert sorted(r["id"] for r in combined) == sorted(r["id"] for r in written)
        assert len(combined) == s["generated"] == sum(r["status"] == "ok" for r in results)
        for row in combined:
            _check_row(row, images)
        assert json.loads((out / "run.json").read_text())

        # a rerun resumes: nothing is asked again, our server sees no new request
        before = (out / "llava_instruct.json").read_bytes()
        assert main(argv) == 0
        s2 = json.loads((out / "summary.json").read_text())
        assert (s2["already_done"], s2["requests"], s2["failed"]) == (items, 0, 0), s2
        assert _stats(srv)["requests_completed"] == items
        assert (out / "llava_instruct.json").read_bytes() == before
    finally:
        srv.shutdown()
        srv.server_close()
