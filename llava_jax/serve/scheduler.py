"""Windowed batching: requests that arrive together share one engine batch.

One worker thread owns the engine. When it is idle and a request arrives, it waits up to
`window_s` for more (or until `max_batch` are queued) and runs them as one batch; requests that
arrive while a batch is running queue up and form the next batch. At most `max_pending`
requests may be queued or running; `submit` raises `QueueFull` beyond that (HTTP 429).
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
                 max_pending: int = 32):
        if max_batch < 1 or max_pending < 1:
            raise ValueError("max_batch and max_pending must be >= 1")
        self.generator = generator
        self.max_batch = int(max_batch)
        self.window_s = float(window_s)
        self.max_pending = int(max_pending)
        self._queue: collections.deque[Completion] = collections.deque()
        self._cv = threading.Condition()
        self._pending = 0
        self._running = 0
        self._stop = False
        self.batch_sizes: collections.Counter = collections.Counter()
        self.completed = 0
        self.rejected = 0
        self.errors = 0
        self.generated_tokens = 0
        self._thread = threading.Thread(target=self._loop, name="llava-batcher", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ API
    def submit(self, completion: Completion) -> Completion:
        with self._cv:
            if self._stop:
                raise QueueFull("the server is shutting down")
            if self._pending >= self.max_pending:
                self.rejected += 1
                raise QueueFull(f"{self._pending} requests are queued or running (limit {self.max_pending}); "
                                "retry later")
            self._pending += 1
            user_done = completion.on_done

            def done(c, user_done=user_done):  # free the slot before the client hears back
                with self._cv:
                    self._pending -= 1
                    self.completed += 1
                if user_done:
                    user_done(c)

            completion.on_done = done
            self._queue.append(completion)
            self._cv.notify_all()
        return completion

    def stats(self) -> dict:
        with self._cv:
            sizes = dict(sorted(self.batch_sizes.items()))
            return {
                "batches": sum(sizes.values()),
                "batch_sizes": {str(k): v for k, v in sizes.items()},  # batch size -> number of batches
                "max_batch_size": max(sizes) if sizes else 0,
                "requests_completed": self.completed,
                "requests_rejected": self.rejected,
                "request_errors": self.errors,
                "generated_tokens": self.generated_tokens,
                "queued": len(self._queue),
                "running": self._running,
                "limits": {"max_batch": self.max_batch, "max_pending": self.max_pending,
                           "window_ms": self.window_s * 1000},
                "compilations": dict(self.generator.engine.traces),
            }

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
            batch = [self._queue.popleft() for _ in range(n)]
            self._running = n
            return batch

    def _loop(self):
        while True:
            batch = self._take()
            if batch is None:
                return
            live = [c for c in batch if not c.cancelled]
            with self._cv:  # counted before running, so stats read after a response include its batch
                if live:
                    self.batch_sizes[len(live)] += 1
            for c in batch:
                if c.cancelled:
                    c.finish_reason = "cancelled"
                    if c.on_done:
                        c.on_done(c)
            try:
                if live:
                    self.generator.run(live)
            except Exception:  # noqa: BLE001 - the generator reported it to the requests; keep serving
                log.exception("generation failed for a batch of %d", len(live))
                with self._cv:
                    self.errors += len(live)
            finally:
                with self._cv:
                    self.generated_tokens += sum(c.completion_tokens for c in live)
                    self._running = 0

