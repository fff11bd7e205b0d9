"""Serving throughput at several concurrency levels, through the real HTTP API.

    python -m llava_jax.tools.serve_bench --model DIR --images IMG_DIR --concurrency 1,4,8

Starts the server in-process on 127.0.0.1, then for each concurrency level C runs C client
threads that each send requests back to back (one image + one question, greedy) until
`--requests` have completed; a first untimed round compiles the shapes. Reports requests/s,
generated tokens/s, latency and the engine batch sizes the scheduler formed.
"""
from __future__ import annotations

import argparse
import base64
import json
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

QUESTIONS = ["What color is the cross?", "How many shapes are there?", "Which shape is red?",
             "Describe the image.", "Is there a circle?", "Where is the square?"]


def _post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=600).read())


def run_level(url, model, images, concurrency, n_requests, max_tokens: list[int]):
    lock = threading.Lock()
    state = {"next": 0, "tokens": 0, "lat": []}

    def worker():
        while True:
            with lock:
                i = state["next"]
                if i >= n_requests:
                    return
                state["next"] += 1
            img = images[i % len(images)]
            body = {"model": model, "max_tokens": max_tokens[i % len(max_tokens)], "temperature": 0, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": img}}, {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]}]}
            t = time.perf_counter()
            r = _post(url, body)
            with lock:
                state["lat"].append(time.perf_counter() - t)
                state["tokens"] += r["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(state["lat"])
    return {"concurrency": concurrency, "requests": n_requests, "seconds": wall, "requests_per_s": n_requests / wall,
            "tokens_per_s": state["tokens"] / wall, "tokens": state["tokens"], "latency_mean_s": float(lat.mean()),
            "latency_p95_s": float(np.percentile(lat, 95))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--images", required=True, help="a folder of images (PNG/JPEG) to ask about")
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--requests", type=int, default=32, help="timed requests per level")
    ap.add_argument("--max-tokens", default="16", help="max_tokens per request; a list (4,64) is cycled")
    ap.add_argument("--batching", choices=("continuous", "windowed"), default="continuous")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--window-ms", type=float, default=10)
    ap.add_argument("--quantize", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from llava_jax.serve.generator import ChatGenerator
    from llava_jax.serve.server import make_server, serve_in_thread

    files = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:64]
    images = [f"data:image/{f.suffix[1:].lower()};base64," + base64.b64encode(f.read_bytes()).decode() for f in files]
    gen = ChatGenerator.from_pretrained(args.model, quantize=args.quantize)
    max_tokens = [int(x) for x in args.max_tokens.split(",")]
    srv = make_server(gen, "127.0.0.1", 0, max_batch=args.max_batch, window_s=args.window_ms / 1000,
                      max_pending=1024, continuous=args.batching == "continuous")
    serve_in_thread(srv)
    host, port = srv.server_address[:2]
    url = f"http://{host}:{port}/v1/chat/completions"
    rows = []
    try:
        for c in [int(x) for x in args.concurrency.split(",")]:
            run_level(url, gen.name, images, c, 4 * c, max_tokens)  # compile this level's shapes
            before = dict(srv.app.scheduler.batch_sizes)
            traces = sum(gen.engine.traces.values())
            r = run_level(url, gen.name, images, c, args.requests, max_tokens)
            after = srv.app.scheduler.batch_sizes
            r["batch_sizes"] = {k: after[k] - before.get(k, 0) for k in sorted(after) if after[k] - before.get(k, 0)}
            r["compilations_while_timed"] = sum(gen.engine.traces.values()) - traces
            st = srv.app.scheduler.stats()
            r["joined_running_batch"] = st["joined_running_batch"]
            rows.append(r)
            print(f"concurrency {c}: {r['requests_per_s']:.2f} req/s, {r['tokens_per_s']:.1f} tok/s, latency mean "
                  f"{r['latency_mean_s']:.3f}s p95 {r['latency_p95_s']:.3f}s, batches {r['batch_sizes']}, "
                  f"compilations {r['compilations_while_timed']}", flush=True)
    finally:
        srv.shutdown()
        srv.server_close()
    print(f"\nbatching: {args.batching}, max_tokens {args.max_tokens}, max batch {args.max_batch}")
    print("\n| concurrency | requests/s | generated tokens/s | latency mean / p95 | engine batch sizes (size: count) |")
    print("|---|---|---|---|---|")
    for r in rows:
        bs = ", ".join(f"{k}: {v}" for k, v in r["batch_sizes"].items())
        print(f"| {r['concurrency']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
              f"{r['latency_mean_s']:.2f} s / {r['latency_p95_s']:.2f} s | {bs} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
