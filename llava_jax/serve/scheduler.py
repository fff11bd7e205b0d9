"""Batching of concurrent requests: continuous (default) or windowed.

One worker thread owns the engine. When it is idle and a request arrives, it waits up to
`window_s` for more (or until `max_batch` are queued) and starts them as one running batch.
  * continuous: between decode chunks, queued requests join free rows of the running batch
    (first come, first served: when the oldest waiting request does not fit - its prompt is
    longer than the batch's current position, or its max_tokens would overrun the batch's
    cache - nobody else jumps ahead; the batch drains and a new one starts with it);
  * windowed: the batch runs to completion; requests that arrived meanwhile form the next one.
A continuous batch starts with rows for twice its first requests (up to `max_batch`): every row
costs attention over the whole cache at each step, used or not, so a lone request does not pay
for `max_batch` rows. Its cache holds `reserve_new_tokens` new tokens past its first prompts
(default: twice the largest max_tokens among them), which bounds how long it can keep admitting
requests. At most `max_pending` requests may be queued or running; `submit` raises `QueueFull`
beyond that (HTTP 429).

A failure fails only the requests it belongs to, and every one of them hears of it (`on_done`
with `error` set), which also frees its slot: a batch that cannot start fails its requests; a
request that cannot join fails alone and the running batch goes on; any other error fails every
request the worker holds (the running batch), none of the queue. `stats()["running"]` counts
the requests taken from the queue and not yet finished.
"""
from __future__ import annotations

import collections
import logging
import threading
import time

from llava_jax.serve.generator import ChatGenerator, Completion

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    pass


class BatchScheduler:
    def __init__(self, generator: ChatGenerator, *, max_batch: int = 8, window_s: float = 0.01,
                 max_pending: int = 32, continuous: bool = True, reserve_new_tokens: int | None = None):
        if max_batch < 1 or max_pending < 1:
            raise ValueError("max_batch and max_pending must be >= 1")
        self.generator = generator
        self.max_batch = int(max_batch)
        self.window_s = float(window_s)
        self.max_pending = int(max_pending)
        self.continuous = bool(continuous)
        self.reserve_new_tokens = reserve_new_tokens
        self.rows_per_step: collections.Counter = collections.Counter()
        self.joined = 0
        self._queue: collections.deque[Completion] = collections.deque()
        self._cv = threading.Condition()
        self._live: dict[int, Completion] = {}  # id -> every request queued or running, until its on_done
        self._stop = False
        self.batch_sizes: collections.Counter = collections.Counter()
        self.completed = 0
        self.rejected = 0
        self.errors = 0
        self.cancelled = 0
        self.generated_tokens = 0
        self._thread = threading.Thread(target=self._loop, name="llava-batcher", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ API
    def submit(self, completion: Completion) -> Completion:
        with self._cv:
            if self._stop:
                raise QueueFull("the server is shutting down")
            if len(self._live) >= self.max_pending:
                self.rejected += 1
                raise QueueFull(f"{len(self._live)} requests are queued or running (limit {self.max_pending}); "
                                "retry later")
            user_done = completion.on_done

            def done(c, user_done=user_done):  # free the slot before the client hears back; once only
                with self._cv:
                    if self._live.pop(id(c), None) is None:
                        return
                    self.completed += 1
                    self.errors += c.error is not None
                    self.cancelled += c.finish_reason == "cancelled"
                    self.generated_tokens += c.completion_tokens
                if user_done:
                    user_done(c)

            completion.on_done = done
            self._live[id(completion)] = completion
            self._queue.append(completion)
            self._cv.notify_all()
        return completion

    def full(self) -> bool:
        """True (and counted as a rejection) when a new request would be refused."""
        with self._cv:
            if len(self._live) >= self.max_pending:
                self.rejected += 1
                return True
            return False

    def stats(self) -> dict:
        with self._cv:
            sizes = dict(sorted(self.batch_sizes.items()))
            return {
                "batches": sum(sizes.values()),
                "mode": "continuous" if self.continuous else "windowed",
                "batch_sizes": {str(k): v for k, v in sizes.items()},  # requests starting a batch -> count
                "max_batch_size": max(sizes) if sizes else 0,
                "joined_running_batch": self.joined,  # requests that joined a batch already running
                "rows_per_step": {str(k): v for k, v in sorted(self.rows_per_step.items())},
                "max_rows_per_step": max(self.rows_per_step) if self.rows_per_step else 0,
                "requests_completed": self.completed,
                "requests_rejected": self.rejected,
                "request_errors": self.errors,  # requests answered with an error
                "requests_cancelled": self.cancelled,  # their clients hung up
                "generated_tokens": self.generated_tokens,
                "queued": len(self._queue),
                "running": len(self._live) - len(self._queue),
                "limits": {"max_batch": self.max_batch, "max_pending": self.max_pending,
                           "window_ms": self.window_s * 1000},
                "compilations": dict(self.generator.engine.traces),
            }

    def warm_up(self, groups, max_new_tokens: int, timeout: float = 3600.0) -> dict:
        """Compile before serving what real traffic would compile on its first request: each
        group (a list of encoded prompts) is submitted at once, through the same batching path
        as client requests, with `max_new_tokens` (the server's default budget: the cache size
        is part of every compiled shape); each completion is cancelled once a decode chunk has run
        (more than the prefill's one token).
        Returns the compilation counts (engine traces) and the seconds taken."""
        from llava_jax.serve.engine import SamplingParams

        t0 = time.perf_counter()
        for group in groups:
            done = threading.Event()
            left = [len(group)]

            def finished(_c):
                with self._cv:
                    left[0] -= 1
                    if not left[0]:
                        done.set()

            comps = []
            for encoded in group:
                c = Completion(encoded, SamplingParams(max_new_tokens=max_new_tokens), on_done=finished)
                c.on_delta = lambda _text, c=c: setattr(c, "cancelled", c.cancelled or c.completion_tokens > 1)
                comps.append(c)
            for c in comps:
                self.submit(c)
            if not done.wait(timeout):
                raise TimeoutError(f"warm-up batch of {len(group)} did not finish in {timeout:.0f}s")
        with self._cv:  # warm-up requests are not traffic
            self.batch_sizes.clear()
            self.rows_per_step.clear()
            self.completed = self.generated_tokens = self.joined = self.cancelled = 0
        return {"compilations": dict(self.generator.engine.traces), "seconds": time.perf_counter() - t0}

    def close(self, timeout: float | None = 5.0):
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ worker
    def _take(self) -> list[Completion] | None:
        with self._cv:
            while not self._queue and not self._stop:
                self._cv.wait()
            if self._stop:
                return None
            deadline = time.monotonic() + self.window_s
            while len(self._queue) < self.max_batch and not self._stop:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            n = min(len(self._queue), self.max_batch)
            return [self._queue.popleft() for _ in range(n)]

    def _drop_cancelled(self, batch):
        live = []
        for c in batch:
            if c.cancelled:
                c.finish_reason = "cancelled"
                if c.on_done:
                    c.on_done(c)
            else:
                live.append(c)
        return live

    def _admit(self, session) -> list[Completion]:
        """Queued requests that fit the running batch, oldest first."""
        out, dropped = [], []
        with self._cv:
            free = min(session.free, self.max_batch - len(session.rows))
            while self._queue and len(out) < free:
                c = self._queue[0]
                if c.cancelled:
                    dropped.append(self._queue.popleft())
                    continue
                if not session.can_join(c):
                    break
                out.append(self._queue.popleft())
        self._drop_cancelled(dropped)
        return out

    def _fail_taken(self, error: BaseException):
        """Fail every request taken from the queue and not finished: after an unexpected error the
        running batch's state is unknown, and its clients must not wait for it forever."""
        with self._cv:
            queued = {id(c) for c in self._queue}
            taken = [c for key, c in self._live.items() if key not in queued]
        for c in taken:
            c.fail(error)

    def _loop(self):
        session = None
        while True:
            try:
                if session is None:
                    batch = self._take()
                    if batch is None:
                        return
                    live = self._drop_cancelled(batch)
                    if not live:
                        continue
                    with self._cv:  # counted before running, so stats read after a response include it
                        self.batch_sizes[len(live)] += 1
                    slots, reserve = len(live), 0
                    if self.continuous:
                        slots = min(self.max_batch, 2 * len(live))
                        reserve = self.reserve_new_tokens
                        if reserve is None:
                            reserve = 2 * max(c.params.max_new_tokens for c in live)
                    session = self.generator.session(live, slots=slots, reserve_new_tokens=reserve)
                elif self.continuous:
                    joiners = self._admit(session)
                    if joiners:
                        try:
                            session.join(joiners)
                        except Exception:  # noqa: BLE001 - the session failed the joiners; the batch goes on
                            log.exception("requests could not join the running batch")
                        else:
                            with self._cv:
                                self.joined += len(joiners)
                n_rows = len(session.rows)
                session.step()
                with self._cv:
                    self.rows_per_step[n_rows] += 1
                if not session.running:
                    session = None
            except Exception as e:  # noqa: BLE001 - fail this batch's requests (told), keep serving the queue
                log.exception("generation failed")
                session = None
                self._fail_taken(e)
