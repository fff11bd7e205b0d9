"""A scripted OpenAI-compatible chat endpoint on 127.0.0.1 for judge tests.

    with ScriptedJudge(reply_fn) as judge:       # reply_fn(request_json) -> str | (status, str)
        ChatClient(judge.url, "scripted").chat([...])

`reply_fn` gets the parsed request body and returns the assistant text, or (HTTP status, body
text) to answer with an error. Every request is recorded in `judge.requests`, its headers
(looked up case-insensitively) in `judge.headers`.
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ScriptedJudge:
    def __init__(self, reply_fn, delay_s: float = 0.0):
        self.reply_fn = reply_fn
        self.delay_s = delay_s
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self._lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):  # noqa: N802
                n = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(n) or b"{}")
                with judge._lock:
                    judge.requests.append(body)
                    judge.headers.append(self.headers)  # case-insensitive, as HTTP header names are
                if not self.path.endswith("/chat/completions"):
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                if judge.delay_s:
                    import time

                    time.sleep(judge.delay_s)
                out = judge.reply_fn(body)
                if isinstance(out, tuple):
                    status, text = out
                    return self._send(status, {"error": {"message": text}})
                self._send(200, {"id": "x", "object": "chat.completion", "model": body.get("model"),
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": out}}]})

            def _send(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def user_content(body: dict) -> str:
    return next(m["content"] for m in body["messages"] if m["role"] == "user")


def section(content: str, name: str) -> str:
    """The text of "[name]\\n...\\n\\n[End of name]" or of "[name]\\n..." up to the next "[" header."""
    start = content.index(f"[{name}]\n") + len(name) + 3
    end_tag = f"\n\n[End of {name}]"
    end = content.find(end_tag, start)
    if end < 0:
        end = content.find("\n\n[", start)
    return content[start:end]
