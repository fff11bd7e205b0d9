"""The generation run: items -> prompts -> backend (bounded concurrency, cache) -> rows on disk.

An *item* is one (image, type) pair, keyed ``"<image id>/<type>"``. Files under ``out``:

``results.jsonl``   append-only log, one line per finished item: ``{"key", "status": "ok", "row"}``
                    or ``{"key", "status": "rejected", "reason", "detail", "text", "next_attempt"}``
                    (text cut to 2000 chars). Written by the main thread as each item finishes, so a killed
                    run loses only the items in flight. A rerun skips every key present (add
                    ``retry_rejected`` to ask again for the rejected ones).
``cache.jsonl``     request cache (default location; ``cache_path`` moves or shares it):
                    ``{"key": sha256 of the request body + re-ask attempt, "completion": {...}}``,
                    appended as soon as a reply arrives, before it is parsed. A request whose key
                    is cached is never sent again, so a rerun after a kill, a changed parser or
                    a deleted ``results.jsonl`` costs no tokens for what was already answered.
``run.json``        the settings that must not change between resumed runs (backend model and
                    sampling, seed, prompt hashes per type, box decimals); a mismatch is an error
                    (use a new ``out``).
``<type>.json``     LLaVA rows of one type (JSON list, annotation order), rebuilt at the end of
                    every run from ``results.jsonl``;
``llava_instruct.json`` all types together (per image, types in ``TASKS`` order).
``summary.json``    the figures of the last run (also printed).

Partial last lines (a kill in the middle of a write) are cut off when a file is reopened.
Re-asks: a reply that parses to a rejection is asked again up to ``parse_retries`` times, each
time as a new request (cache key includes the attempt number); after that the item is recorded
as rejected. ``retry_rejected`` continues the attempt numbering (``next_attempt`` in the
rejected record), so it sends new requests instead of replaying the cached rejected replies. A request that fails after all its retries leaves the item *failed*: it is not
recorded, the rerun tries it again, and the command exits with status 1.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

from llava_jax.datagen.annotations import Annotation
from llava_jax.datagen.backends import (Completion, FatalBackendError, Request, RequestFailed, Stats,
                                        describe)
from llava_jax.datagen.parse import reply_to_row
from llava_jax.datagen.prompts import TASKS, PromptSet, render_context

__all__ = ["SettingsMismatch", "JsonlLog", "RequestCache", "generate", "assemble", "format_summary"]

RUN_FORMAT = "llava_jax.datagen/1"


class JsonlLog:
    """An append-only JSONL file whose records survive a kill (a cut last line is dropped)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end != len(data):  # a partial record from a killed writer: cut it off
            with open(self.path, "r+b") as f:
                f.truncate(end)
            data = data[:end]
        out = []
        for line in data.split(b"\n"):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # only possible for a file edited by hand; skip the line
        return out

    def append(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as f:
                f.write(line)
                f.flush()


class RequestCache:
    """``key -> Completion``, persisted in a :class:`JsonlLog`; thread-safe."""

    def __init__(self, path: str | os.PathLike | None):
        self.log = JsonlLog(path) if path is not None else None
        self._data: dict[str, dict] = {}
        self._lock = threading.Lock()
        if self.log is not None:
            for rec in self.log.read():
                if isinstance(rec.get("key"), str) and isinstance(rec.get("completion"), dict):
                    self._data[rec["key"]] = rec["completion"]

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str) -> Completion | None:
        with self._lock:
            d = self._data.get(key)
        return None if d is None else Completion.from_json(d)

    def put(self, key: str, comp: Completion) -> None:
        with self._lock:
            self._data[key] = comp.to_json()
        if self.log is not None:
            self.log.append({"key": key, "completion": comp.to_json()})


class SettingsMismatch(ValueError):
    """``out`` holds a run made with other settings."""


def _check_run_settings(out: Path, settings: dict, force: bool) -> None:
    path = out / "run.json"
    if path.exists():
        old = json.loads(path.read_text())
        prompts_old = old.get("prompts", {})
        diff = [k for k in settings if k != "prompts" and old.get(k) != settings[k]]
        diff += [f"prompts[{t}]" for t, h in settings["prompts"].items() if t in prompts_old and prompts_old[t] != h]
        if diff and not force:
            raise SettingsMismatch(
                f"{out} holds a run with different settings ({', '.join(diff)}): "
                f"was {json.dumps({k: old.get(k) for k in diff if not k.startswith('prompts')})}. "
                "Use a new --out, or --force to mix them knowingly.")
        settings = {**settings, "prompts": {**prompts_old, **settings["prompts"]}}
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(settings, indent=1))
    os.replace(tmp, path)


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)
    os.replace(tmp, path)


def assemble(out: str | os.PathLike, order: Sequence[str] = (), tasks: Sequence[str] = ()) -> dict[str, int]:
    """Rebuild ``<type>.json`` and ``llava_instruct.json`` from ``results.jsonl``.

    Rows are ordered by image (``order``: image ids in annotation order; ids not in it follow in
    first-seen order), then type. ``tasks``: types whose file is written even when empty.
    Returns {file name: rows}."""
    out = Path(out)
    latest: dict[str, dict] = {}
    for rec in JsonlLog(out / "results.jsonl").read():
        if "key" in rec:
            latest[rec["key"]] = rec
    rank = {i: n for n, i in enumerate(order)}
    items = []
    for n, (key, rec) in enumerate(latest.items()):
        if rec.get("status") != "ok":
            continue
        image_id, _, task = key.rpartition("/")
        items.append(((rank.get(image_id, len(rank)), n if image_id not in rank else 0,
                       TASKS.index(task) if task in TASKS else len(TASKS)), task, rec["row"]))
    items.sort(key=lambda x: x[0])
    counts = {}
    by_task: dict[str, list] = {}
    for _, task, row in items:
        by_task.setdefault(task, []).append(row)
    for task, rows in by_task.items():
        _write_json_atomic(out / f"{task}.json", rows)
        counts[f"{task}.json"] = len(rows)
    for task in TASKS:  # a requested type without rows: an empty file (never a stale one)
        if task not in by_task and (task in tasks or (out / f"{task}.json").exists()):
            _write_json_atomic(out / f"{task}.json", [])
            counts[f"{task}.json"] = 0
    _write_json_atomic(out / "llava_instruct.json", [row for _, _, row in items])
    counts["llava_instruct.json"] = len(items)
    return counts


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, unit="item", desc="datagen", file=sys.stderr, dynamic_ncols=True, smoothing=0.05)


def generate(
    annotations: Sequence[Annotation],
    tasks: Sequence[str],
    backend,
    prompts: dict[str, PromptSet],
    out: str | os.PathLike,
    *,
    seed: int = 0,
    concurrency: int = 8,
    parse_retries: int = 1,
    cache_path: str | os.PathLike | None | bool = True,
    retry_rejected: bool = False,
    decimals: int = 3,
    progress: bool = True,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Run (or resume) a generation into ``out``; returns the summary (see the module docstring).

    ``cache_path``: True = ``out/cache.jsonl``; a path; False/None = no cache (the template
    backend is never cached)."""
    t0 = time.perf_counter()
    out = Path(out)
    tasks = list(dict.fromkeys(tasks))
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown type {t!r}; use {TASKS}")
        if t not in prompts:
            raise ValueError(f"no prompts for type {t!r}")
    settings = {"format": RUN_FORMAT, "seed": seed, "decimals": decimals, **backend.fingerprint(),
                "prompts": {t: prompts[t].sha256 for t in tasks}}
    _check_run_settings(out, settings, force)

    if cache_path is True:
        cache_path = out / "cache.jsonl"
    cache = RequestCache(cache_path) if (cache_path and getattr(backend, "cacheable", False)) else RequestCache(None)
    results = JsonlLog(out / "results.jsonl")
    done: dict[str, dict] = {}
    for rec in results.read():
        if "key" in rec:
            done[rec["key"]] = rec
    finished = {k for k, r in done.items()
                if r.get("status") == "ok" or (r.get("status") == "rejected" and not retry_rejected)}

    items = [(ann, task) for ann in annotations for task in tasks]
    todo = [(a, t) for a, t in items if f"{a.id}/{t}" not in finished]
    stats = Stats()
    counts: Counter = Counter()
    rejected: Counter = Counter()
    failed_causes: Counter = Counter()
    cache_hits = [0]
    hits_lock = threading.Lock()
    stop = threading.Event()
    fatal: list[str] = []
    failed_examples: list[str] = []
    log(f"[datagen] {len(items)} items ({', '.join(tasks)}) over {len(annotations)} images; "
        f"{len(items) - len(todo)} already done in {out}; backend: {describe(backend)}"
        + (f"; cache: {cache_path} ({len(cache)} entries)" if cache.log is not None else ""))

    def work(ann: Annotation, task: str) -> dict:
        key = f"{ann.id}/{task}"
        messages = prompts[task].messages(render_context(ann, decimals))
        last = None
        prev = done.get(key)
        base = int(prev.get("next_attempt", 0)) if prev and prev.get("status") == "rejected" else 0
        for attempt in range(base, base + parse_retries + 1):
            if stop.is_set():
                return {"key": key, "status": "cancelled"}
            req = Request(task, ann, messages, attempt)
            ckey = backend.cache_key(req) if cache.log is not None else None
            comp = cache.get(ckey) if ckey else None
            if comp is not None:
                with hits_lock:
                    cache_hits[0] += 1
            else:
                try:
                    comp = backend.complete(req, stats)
                except RequestFailed as e:
                    return {"key": key, "status": "failed", "cause": e.cause, "detail": str(e)}
                except FatalBackendError as e:
                    stop.set()
                    fatal.append(str(e))
                    return {"key": key, "status": "cancelled"}
                if ckey:
                    cache.put(ckey, comp)
            parsed = reply_to_row(task, ann, comp.text, comp.finish_reason, seed)
            if parsed.row is not None:
                return {"key": key, "status": "ok", "row": parsed.row}
            last = {"key": key, "status": "rejected", "reason": parsed.reason, "detail": parsed.detail,
                    "text": (comp.text or "")[:2000], "next_attempt": attempt + 1}
        return last

    bar = _progress(len(todo), progress)
    interrupted = False
    pool = cf.ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="datagen")
    try:
        pending: set = set()
        it = iter(todo)
        window = max(1, concurrency) * 2
        while True:
            while len(pending) < window and not stop.is_set():
                nxt = next(it, None)
                if nxt is None:
                    break
                pending.add(pool.submit(work, *nxt))
            if not pending:
                break
            finished_now, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for fut in finished_now:
                res = fut.result()
                status = res["status"]
                if status in ("ok", "rejected"):
                    results.append(res)
                counts[status] += 1
                if status == "rejected":
                    rejected[res["reason"]] += 1
                elif status == "failed":
                    failed_causes[res["cause"]] += 1
                    if len(failed_examples) < 3:
                        failed_examples.append(f"{res['key']}: {res['detail']}")
                if bar is not None and status != "cancelled":
                    bar.update(1)
                    bar.set_postfix(ok=counts["ok"], rej=counts["rejected"], fail=counts["failed"],
                                    retries=sum(stats.retries.values()), refresh=False)
    except KeyboardInterrupt:
        interrupted = True
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        if bar is not None:
            bar.close()
        if not interrupted:
            pool.shutdown(wait=True)
        if interrupted:
            log("[datagen] interrupted; finished items are saved: rerun the same command to resume")

    written = assemble(out, [a.id for a in annotations], tasks)
    summary = {
        "items": len(items),
        "already_done": len(items) - len(todo),
        "generated": counts["ok"],
        "rejected": counts["rejected"],
        "rejected_by_reason": dict(rejected.most_common()),
        "failed": counts["failed"],
        "failed_by_cause": dict(failed_causes.most_common()),
        "failed_examples": failed_examples,
        "not_started": counts["cancelled"] + (len(todo) - sum(counts.values())),
        "requests": stats.requests,
        "cache_hits": cache_hits[0],
        "retries": sum(stats.retries.values()),
        "retries_by_cause": dict(stats.retries.most_common()),
        "tokens": {k: stats.tokens.get(k, 0) for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
        "rows_written": written,
        "seconds": round(time.perf_counter() - t0, 3),
        "fatal": fatal[0] if fatal else None,
        "out": str(out),
    }
    _write_json_atomic(out / "summary.json", summary)
    log(format_summary(summary))
    return summary


def _counter_text(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items())


def format_summary(s: dict) -> str:
    lines = [
        f"[datagen] {s['items']} items: {s['already_done']} already done, {s['generated']} generated, "
        f"{s['rejected']} rejected" + (f" ({_counter_text(s['rejected_by_reason'])})" if s["rejected"] else "")
        + f", {s['failed']} failed" + (f" ({_counter_text(s['failed_by_cause'])})" if s["failed"] else "")
        + (f", {s['not_started']} not started" if s["not_started"] else ""),
        f"[datagen] {s['requests']} requests, {s['cache_hits']} cache hits, {s['retries']} retries"
        + (f" ({_counter_text(s['retries_by_cause'])})" if s["retries"] else "")
        + f"; tokens: prompt {s['tokens']['prompt_tokens']:,}, completion {s['tokens']['completion_tokens']:,}, "
          f"total {s['tokens']['total_tokens']:,}",
        f"[datagen] rows: {_counter_text(s['rows_written'])} in {s['out']} ({s['seconds']:.1f}s)",
    ]
    for ex in s.get("failed_examples") or []:
        lines.append(f"[datagen] failed: {ex}")
    if s["failed"]:
        lines.append("[datagen] rerun the same command to retry the failed items")
    if s.get("fatal"):
        lines.append(f"[datagen] STOPPED: {s['fatal']}")
    return "\n".join(lines)
