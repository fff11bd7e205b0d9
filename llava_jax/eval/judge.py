"""A small client for any OpenAI-compatible chat endpoint, and the judge-score parser.

    client = ChatClient("https://api.openai.com/v1", model="gpt-4o")      # key from $OPENAI_API_KEY
    text = client.chat([{"role": "user", "content": "..."}])
    parse_scores("8 9\\nBoth assistants ...")  # -> (8.0, 9.0)

The client is stdlib only (urllib): it POSTs ``{base_url}/chat/completions`` with a bearer key
read from an environment variable, and retries transport errors, timeouts, 408/409/429 and 5xx
(exponential backoff, ``Retry-After`` honoured). Other HTTP errors fail at once with the
server's message. Any server that speaks the OpenAI chat API works: OpenAI, vLLM, llama.cpp,
this project's own server.
"""
from __future__ import annotations

import json
import os
import random
import re
import socket
import time
import urllib.error
import urllib.request
from typing import Sequence

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class JudgeError(RuntimeError):
    """The judge endpoint could not give an answer (after retries, or a non-retryable error)."""


class ChatClient:
    """OpenAI-compatible chat-completions client.

    base_url: the API root, e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``;
      a URL that already ends in ``/chat/completions`` is used as is.
    api_key: the key; None reads the environment variable ``api_key_env`` (no key: no
      Authorization header, fine for local servers).
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

    def _request(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        self.requests_sent += 1
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            return json.loads(r.read().decode("utf-8"))

    def chat(self, messages: Sequence[dict], **overrides) -> str:
        """The assistant message text for `messages` (OpenAI chat format)."""
        body = {"model": self.model, "messages": list(messages), "temperature": self.temperature,
                "max_tokens": self.max_tokens, **self.extra_body, **overrides}
        last = None
        for attempt in range(self.max_retries + 1):
            wait = min(self.max_backoff, self.backoff * 2 ** attempt) * (0.75 + 0.5 * random.random())
            try:
                out = self._request(body)
            except urllib.error.HTTPError as e:
                detail = _error_text(e)
                if e.code not in RETRY_STATUS:
                    hint = ""
                    if e.code in (401, 403):
                        hint = f" (is the key right? it is read from ${self.api_key_env})"
                    elif e.code == 404:
                        hint = " (the URL should be the API root, e.g. http://host:port/v1)"
                    raise JudgeError(f"judge {self.url} answered HTTP {e.code}: {detail}{hint}") from e
                last = f"HTTP {e.code}: {detail}"
                ra = e.headers.get("Retry-After") if e.headers else None
                if ra:
                    try:
                        wait = min(self.max_backoff, float(ra))
                    except ValueError:
                        pass
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except json.JSONDecodeError as e:
                last = f"response is not JSON: {e}"
            else:
                try:
                    content = out["choices"][0]["message"]["content"]
                except (KeyError, IndexError, TypeError) as e:
                    raise JudgeError(f"judge {self.url} sent no choices[0].message.content: {str(out)[:300]}") from e
                return content if isinstance(content, str) else _content_text(content)
            if attempt < self.max_retries:
                time.sleep(wait)
        raise JudgeError(f"judge {self.url} failed after {self.max_retries + 1} attempts; last error: {last}")


def _error_text(e: urllib.error.HTTPError) -> str:
    try:
        raw = e.read().decode("utf-8", "replace")
    except Exception:  # noqa: BLE001
        return str(e.reason)
    try:
        err = json.loads(raw).get("error")
        if isinstance(err, dict):
            return str(err.get("message", err))
        if err:
            return str(err)
    except (ValueError, AttributeError):
        pass
    return raw[:300] or str(e.reason)


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
