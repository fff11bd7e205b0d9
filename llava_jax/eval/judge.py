"""A small client for any OpenAI-compatible chat endpoint, and the judge-score parser.

    client = ChatClient("https://api.openai.com/v1", model="gpt-4o")      # key from $OPENAI_API_KEY
    text = client.chat([{"role": "user", "content": "..."}])
    parse_scores("8 9\\nBoth assistants ...")  # -> (8.0, 9.0)

The client sends ``POST {base_url}/chat/completions`` through the official ``openai`` package
with a bearer key read from an environment variable (none: the placeholder ``EMPTY``, which a
server without keys ignores), and retries transport errors, timeouts, 408/409/425/429 and
500/502/503/504 (exponential backoff, ``Retry-After`` honoured). Other HTTP errors fail at once
with the server's message. Any server that speaks the OpenAI chat API works: OpenAI, vLLM,
llama.cpp, this project's own server.
"""
from __future__ import annotations

import json
import os
import random
import re
import time
from typing import Sequence

import openai

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class JudgeError(RuntimeError):
    """The judge endpoint could not give an answer (after retries, or a non-retryable error)."""


class ChatClient:
    """OpenAI-compatible chat-completions client.

    base_url: the API root, e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``;
      a URL that already ends in ``/chat/completions`` is used as is.
    api_key: the key; None reads the environment variable ``api_key_env`` (no key: the SDK gets
      the placeholder ``EMPTY``, fine for local servers).
    timeout: seconds per HTTP request. max_retries: extra attempts on retryable errors.
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", timeout: float = 120.0, max_retries: int = 5,
                 backoff: float = 1.0, max_backoff: float = 60.0, temperature: float = 0.2,
                 max_tokens: int = 1024, extra_body: dict | None = None):
        url = base_url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get(api_key_env) or None
        self.api_key_env = api_key_env
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.extra_body = dict(extra_body or {})
        self.requests_sent = 0
        # max_retries=0: chat() below retries, as llava_jax.datagen.backends does, so that both keep
        # one documented policy (backoff, Retry-After capped by max_backoff, a 200 that is not
        # JSON retried too) and every attempt is counted in requests_sent.
        self._client = openai.OpenAI(base_url=self.url[: -len("/chat/completions")],
                                     api_key=self.api_key or "EMPTY", timeout=self.timeout, max_retries=0)

    def _request(self, body: dict):
        """One attempt; the parsed ChatCompletion (lenient: a missing field fails on access).
        Fields other than model/messages/temperature/max_tokens go in the SDK's ``extra_body``,
        merged into the same JSON body over the fields of the same name."""
        fields = {k: v for k, v in body.items() if k in _SDK_FIELDS}
        extra = {k: v for k, v in body.items() if k not in _SDK_FIELDS}
        self.requests_sent += 1
        out = self._client.chat.completions.create(**fields, extra_body=extra or None)
        if isinstance(out, str):  # the SDK hands back the text of a reply that is not JSON
            raise _NotJSON(f"body starts {out[:120]!r}")
        return out

    def chat(self, messages: Sequence[dict], **overrides) -> str:
        """The assistant message text for `messages` (OpenAI chat format)."""
        body = {"model": self.model, "messages": list(messages), "temperature": self.temperature,
                "max_tokens": self.max_tokens, **self.extra_body, **overrides}
        last = None
        for attempt in range(self.max_retries + 1):
            wait = min(self.max_backoff, self.backoff * 2 ** attempt) * (0.75 + 0.5 * random.random())
            try:
                out = self._request(body)
            except openai.APIStatusError as e:
                detail = _error_text(e)
                if e.status_code not in RETRY_STATUS:
                    hint = ""
                    if e.status_code in (401, 403):
                        hint = f" (is the key right? it is read from ${self.api_key_env})"
                    elif e.status_code == 404:
                        hint = " (the URL should be the API root, e.g. http://host:port/v1)"
                    raise JudgeError(f"judge {self.url} answered HTTP {e.status_code}: {detail}{hint}") from e
                last = f"HTTP {e.status_code}: {detail}"
                ra = e.response.headers.get("Retry-After")
                if ra:
                    try:
                        wait = min(self.max_backoff, float(ra))
                    except ValueError:
                        pass
            except openai.APIConnectionError as e:  # APITimeoutError included
                last = f"{type(e).__name__}: {e.__cause__ or e}"
            except (json.JSONDecodeError, _NotJSON) as e:  # a 200 whose body is not JSON
                last = f"response is not JSON: {e}"
            else:
                try:
                    content = out.choices[0].message.content
                except (AttributeError, IndexError, TypeError) as e:
                    raise JudgeError(f"judge {self.url} sent no choices[0].message.content: {str(out)[:300]}") from e
                return content if isinstance(content, str) else _content_text(content)
            if attempt < self.max_retries:
                time.sleep(wait)
        raise JudgeError(f"judge {self.url} failed after {self.max_retries + 1} attempts; last error: {last}")


_SDK_FIELDS = ("model", "messages", "temperature", "max_tokens")  # the rest: extra_body


class _NotJSON(Exception):
    pass


def _error_text(e: openai.APIStatusError) -> str:
    """The server's error message: ``error.message`` (or a string ``error``) of a JSON error body,
    else the body text."""
    err = e.body  # the SDK gives the "error" member of a JSON body, else the parsed body or its text
    if isinstance(err, dict) and err.get("message") is not None:
        return str(err["message"])
    if isinstance(err, str) and err:
        return err[:300]
    return e.response.text[:300] or f"HTTP {e.status_code}"


def _content_text(content) -> str:
    """Content given as a list of parts ([{"type": "text", "text": ...}])."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


# ----------------------------------------------------------------------------- score parsing

_NUM = r"(\d+(?:\.\d+)?)"
# A number on its own: not part of a word, a longer number, or a version-like "1.2.3".
_NUM_ALONE = re.compile(r"(?<![\w.])" + _NUM + r"(?![\w]|\.\d)")
_LABEL = re.compile(r"\b(?:assistant|answer|response)\s*#?\s*[12]\b", re.I)
_OUT_OF = re.compile(r"\s*(?:/\s*10(?:\.0)?\b|\bout\s+of\s+10\b)", re.I)
_MARKUP = re.compile(r"[*_`#>]+")
# Lines that are only a pair: "8 9", "8, 9", "8/10 9/10", "Scores: 8 9", "[8, 9]", "(8; 9)".
_PAIR_LINE = re.compile(r"^\W*(?:(?:overall\s+)?(?:scores?|ratings?)\s*[:=\-]?\s*)?[\[(]?\s*" + _NUM
                        + r"\s*[,;\s]\s*(?:and\s+)?" + _NUM + r"\s*[\])]?\W*$", re.I)
# "Assistant 1: 8", "Assistant 2 score: 7/10", "- Assistant 1 - 9.5 (good)" at the start of a line.
_LABELLED = re.compile(r"^\W*assistant\s*([12])\s*(?:'s)?\s*(?:overall\s+)?(?:score|rating)?\s*[:=\-–]\s*"
                       + _NUM + r"(?!\d)", re.I | re.M)
_TUPLE = re.compile(r"\(\s*" + _NUM + r"\s*,\s*" + _NUM + r"\s*\)")
_SCORE_WORD = re.compile(r"\b(?:scores?|ratings?|output)\b", re.I)


def _clean(line: str) -> str:
    return _OUT_OF.sub("", _MARKUP.sub("", line)).strip()


def _ok(a: float, b: float, lo: float, hi: float) -> tuple[float, float] | None:
    return (a, b) if lo <= a <= hi and lo <= b <= hi else None


def parse_scores(text: str | None, lo: float = 0.0, hi: float = 10.0) -> tuple[float, float] | None:
    """The (assistant 1, assistant 2) score pair from a judge reply, or None if there is none.

    In order, the first rule that finds a pair in [lo, hi] wins:
    1. the first non-empty line, when it holds exactly two numbers once markdown, "Assistant 1/2"
       labels and "/10" or "out of 10" are removed ("8 9", "8,9", "**8.5 9**", "Scores: 8/10 and
       9/10", "Assistant 1: 7, Assistant 2: 9");
    2. the first line anywhere that is just a pair ("Scores: 8 9", "[8, 9]");
    3. the last "Assistant 1: X" and "Assistant 2: Y" lines ("Assistant 2: 2/10 (...)");
    4. the last "(X, Y)" on a line that mentions score(s), rating(s) or output.
    """
    if not text:
        return None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return None
    first = _clean(_LABEL.sub(" ", lines[0]))
    nums = _NUM_ALONE.findall(first)
    if len(nums) == 2 and (p := _ok(float(nums[0]), float(nums[1]), lo, hi)):
        return p
    for ln in lines:
        m = _PAIR_LINE.match(_clean(ln))
        if m and (p := _ok(float(m.group(1)), float(m.group(2)), lo, hi)):
            return p
    found: dict[str, float] = {}
    for m in _LABELLED.finditer(_MARKUP.sub("", text)):
        found[m.group(1)] = float(m.group(2))
    if len(found) == 2 and (p := _ok(found["1"], found["2"], lo, hi)):
        return p
    for ln in reversed(lines):
        if _SCORE_WORD.search(ln):
            for m in reversed(list(_TUPLE.finditer(ln))):
                if p := _ok(float(m.group(1)), float(m.group(2)), lo, hi):
                    return p
    return None
