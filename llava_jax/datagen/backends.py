"""Backends that turn a chat prompt into a reply.

* :class:`OpenAIChatBackend`: any OpenAI-compatible ``POST {base_url}/chat/completions``
  endpoint (OpenAI, vLLM, llama.cpp server, TGI, this project's own server, ...), through the
  official ``openai`` client (no key: the placeholder ``EMPTY``, as for a local vLLM). Per
  request: a timeout (connect and each read), and retries with exponential backoff and jitter on
  HTTP 408/409/425/429/5xx, timeouts, dropped connections and unreadable 200 replies (not JSON, no
  ``choices``); a ``Retry-After`` header is honoured (capped by ``max_backoff``). Delay before retry ``k`` (k = 1, 2, ...): ``min(max_backoff, backoff *
  2**(k-1)) * U(0.5, 1)``. HTTP 401/403/404 stop the whole run (a wrong key, model or URL will
  not fix itself); other 4xx fail only that item.
* :class:`TemplateBackend`: the offline deterministic writer of :mod:`.offline`.

Both are thread-safe; :class:`Stats` collects requests, retries (by cause) and token usage.
"""
from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import openai

from llava_jax.datagen.annotations import Annotation

__all__ = ["Request", "Completion", "Stats", "RequestFailed", "FatalBackendError",
           "OpenAIChatBackend", "TemplateBackend"]


@dataclass(frozen=True)
class Request:
    task: str
    annotation: Annotation
    messages: list
    attempt: int = 0  # > 0: a re-ask after a rejected reply (a new cache entry)


@dataclass
class Completion:
    text: str | None
    finish_reason: str | None = None
    usage: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"text": self.text, "finish_reason": self.finish_reason, "usage": self.usage}

    @classmethod
    def from_json(cls, d: dict) -> "Completion":
        return cls(d.get("text"), d.get("finish_reason"), d.get("usage") or {})


class RequestFailed(RuntimeError):
    """This item could not be completed (retries exhausted or a non-retryable 4xx)."""

    def __init__(self, cause: str, message: str):
        self.cause = cause
        super().__init__(message)


class FatalBackendError(RuntimeError):
    """No request can succeed (401/403/404): stop the run."""


class Stats:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests = 0
        self.retries: Counter = Counter()
        self.tokens: Counter = Counter()

    def request(self) -> None:
        with self._lock:
            self.requests += 1

    def retry(self, cause: str) -> None:
        with self._lock:
            self.retries[cause] += 1

    def usage(self, usage: dict) -> None:
        with self._lock:
            for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
                v = usage.get(k)
                if isinstance(v, int):
                    self.tokens[k] += v


class TemplateBackend:
    """Offline, deterministic (see :mod:`llava_jax.datagen.offline`). Not cached: it is free."""

    name = "template"
    cacheable = False

    def __init__(self, seed: int = 0):
        self.seed = seed

    def fingerprint(self) -> dict:
        return {"backend": self.name, "seed": self.seed}

    def complete(self, req: Request, stats: Stats) -> Completion:
        from llava_jax.datagen.offline import write_reply

        stats.request()
        return Completion(write_reply(req.task, req.annotation, self.seed), "stop", {})


_RETRY_STATUS = {408, 409, 425, 429}
_FATAL_STATUS = {401, 403, 404}


class _BadReply(Exception):
    pass


_SDK_FIELDS = ("model", "messages", "temperature", "max_tokens", "top_p")  # the rest: extra_body
_USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")


class OpenAIChatBackend:
    """OpenAI-compatible chat completions over HTTP (see the module docstring)."""

    name = "openai"
    cacheable = True

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, temperature: float = 0.7,
                 max_tokens: int = 1024, top_p: float | None = None, timeout: float = 120.0,
                 max_retries: int = 6, backoff: float = 1.0, max_backoff: float = 60.0,
                 extra_body: dict | None = None, sleep=time.sleep):
        if not model:
            raise ValueError("--model is required for the openai backend")
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.top_p = top_p
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.extra_body = dict(extra_body or {})
        self._sleep = sleep
        self._rng = random.Random()
        # max_retries=0: the SDK sends each attempt once and the loop in complete() retries. The
        # SDK's own retries would hide the attempts from Stats (requests, retries by cause), use
        # their own delays instead of the documented ones (and of `sleep`), and never retry an
        # unreadable 200 reply. The client is thread-safe: one for all worker threads.
        self._client = openai.OpenAI(base_url=self.base_url, api_key=api_key or "EMPTY", timeout=timeout,
                                     max_retries=0)

    def fingerprint(self) -> dict:
        return {"backend": self.name, "model": self.model, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "top_p": self.top_p, "extra_body": self.extra_body}

    def body(self, req: Request) -> dict:
        b = {"model": self.model, "messages": req.messages, "temperature": self.temperature}
        if self.max_tokens and self.max_tokens > 0:  # 0: leave the limit to the server
            b["max_tokens"] = self.max_tokens
        if self.top_p is not None:
            b["top_p"] = self.top_p
        b.update(self.extra_body)
        return b

    def cache_key(self, req: Request) -> str:
        """sha256 of the request body (model, messages, sampling settings) + the re-ask attempt."""
        blob = json.dumps({"body": self.body(req), "attempt": req.attempt}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    # -- one HTTP exchange ---------------------------------------------------------------
    def _post(self, body: dict):
        """One attempt: the raw response of a 200 (parsed by :meth:`_parse`), else the SDK's error.
        The --extra-body fields go as the SDK's ``extra_body``: merged into the same JSON body,
        over the fields of the same name, so the server gets exactly :meth:`body`."""
        fields = {k: v for k, v in body.items() if k in _SDK_FIELDS}
        extra = {k: v for k, v in body.items() if k not in _SDK_FIELDS}
        return self._client.chat.completions.with_raw_response.create(**fields, extra_body=extra or None)

    @staticmethod
    def _parse(raw) -> Completion:
        try:
            d = raw.parse()  # the SDK's ChatCompletion (lenient: a missing field fails on access)
            choice = d.choices[0]
            text = choice.message.content
            if text is not None and not isinstance(text, str):
                raise TypeError("content is not a string")
            u = getattr(d, "usage", None)
            usage = {k: getattr(u, k, None) for k in _USAGE_KEYS}
            return Completion(text, choice.finish_reason, {k: v for k, v in usage.items() if isinstance(v, int)})
        except Exception as e:  # noqa: BLE001 - any shape problem is a bad reply
            raise _BadReply(f"{type(e).__name__}: {e}; body starts {raw.http_response.content[:120]!r}") from None

    def _delay(self, retry: int, headers) -> float:
        ra = {k.lower(): v for k, v in headers.items()}.get("retry-after")
        if ra is not None:
            try:
                return min(self.max_backoff, max(0.0, float(ra)))
            except ValueError:
                pass
        return min(self.max_backoff, self.backoff * 2 ** (retry - 1)) * (0.5 + 0.5 * self._rng.random())

    def complete(self, req: Request, stats: Stats) -> Completion:
        body = self.body(req)
        last = ""
        for attempt in range(self.max_retries + 1):
            headers: dict = {}
            stats.request()
            try:
                raw = self._post(body)
            except openai.APITimeoutError:
                cause, last = "timeout", f"no reply within {self.timeout}s"
            except openai.APIConnectionError as e:
                cause, last = "connection", f"{self.url}: {e.__cause__ or e}"
            except openai.APIStatusError as e:
                status, headers, text = e.status_code, dict(e.response.headers), e.response.text
                if status in _FATAL_STATUS:
                    raise FatalBackendError(
                        f"{self.url} answered HTTP {status}: {text[:300]}. "
                        + {401: "Check the API key (--api-key-env names the variable that holds it).",
                           403: "The key is not allowed to use this model or endpoint.",
                           404: "Check --base-url (it should end before /chat/completions) and --model."}[status])
                if not (status in _RETRY_STATUS or 500 <= status < 600):
                    raise RequestFailed(f"http_{status}", f"HTTP {status}: {text[:300]}")
                cause, last = f"http_{status}", text[:200]
            else:
                try:
                    comp = self._parse(raw)
                except _BadReply as e:
                    cause, last = "bad_reply", str(e)
                else:
                    stats.usage(comp.usage)
                    return comp
            if attempt == self.max_retries:
                raise RequestFailed(cause, f"gave up after {attempt + 1} attempts; last: {cause}: {last}")
            stats.retry(cause)
            self._sleep(self._delay(attempt + 1, headers))
        raise AssertionError("unreachable")  # pragma: no cover


def describe(backend: Any) -> str:
    if isinstance(backend, OpenAIChatBackend):
        return f"openai-compatible {backend.url} model={backend.model}"
    return getattr(backend, "name", type(backend).__name__)
