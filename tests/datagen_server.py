"""A scripted OpenAI-compatible chat server on 127.0.0.1 for the datagen tests.

``ScriptedServer(reply_fn, script_fn)``: for the n-th request (0-based) carrying a given prompt
(sha256 of its messages), ``script_fn(prompt_hash, n)`` picks what happens:

``ok``          200, ``reply_fn(messages)`` as the content, usage counted
``429``         429 with ``Retry-After: 0``          ``500`` / ``503``   that status
``timeout``     sleeps ``hang`` seconds, then closes without answering
``drop``        closes the connection without a response
``bad_json``    200 with a body that is not JSON      ``no_choices``  200 JSON without choices
``garbage``     200 with content that is not in the requested format (usage counted)
``empty``       200 with empty content (usage counted)
``401``         401 (a bad key)

Counters (thread-safe): ``requests[hash]``, ``served[hash]`` (``ok`` replies), ``tokens`` (the
total_tokens of every 200 reply that carried usage), ``auth`` (Authorization headers seen).
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def prompt_hash(messages) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()


class ScriptedServer:
    def __init__(self, reply_fn, script_fn=lambda h, n: "ok", hang: float = 1.0, delay: float = 0.0):
        self.reply_fn, self.script_fn, self.hang, self.delay = reply_fn, script_fn, hang, delay
        self.lock = threading.Lock()
        self.requests: Counter = Counter()
        self.served: Counter = Counter()
        self.actions: Counter = Counter()
        self.tokens = 0
        self.auth: set = set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _send(self, status, body: bytes, headers=()):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                try:
                    self._post()
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _post(self):
                n = int(self.headers.get("Content-Length", 0))
                req = json.loads(self.rfile.read(n))
                if self.path != "/v1/chat/completions":
                    return self._send(404, b'{"error": "not found"}')
                h = prompt_hash(req["messages"])
                with server.lock:
                    k = server.requests[h]
                    server.requests[h] += 1
                    server.auth.add(self.headers.get("Authorization"))
                action = server.script_fn(h, k)
                with server.lock:
                    server.actions[action] += 1
                if server.delay:
                    time.sleep(server.delay)
                if action == "timeout":
                    time.sleep(server.hang)
                    self.close_connection = True
                    return
                if action == "drop":
                    self.close_connection = True
                    return
                if action in ("429", "500", "503", "401"):
                    hdr = [("Retry-After", "0")] if action == "429" else []
                    return self._send(int(action), b'{"error": {"message": "scripted"}}', hdr)
                if action == "bad_json":
                    return self._send(200, b"<html>upstream error</html>")
                if action == "no_choices":
                    return self._send(200, b'{"object": "chat.completion", "choices": []}')
                content = {"ok": None, "garbage": "Sure! Here you go: lorem ipsum.", "empty": ""}[action]
                if content is None:
                    content = server.reply_fn(req["messages"])
                usage = {"prompt_tokens": sum(len(m["content"]) for m in req["messages"]) // 4,
                         "completion_tokens": len(content) // 4}
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                body = {"id": "chatcmpl-1", "object": "chat.completion", "model": req.get("model"),
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                     "finish_reason": "stop"}], "usage": usage}
                with server.lock:
                    server.tokens += usage["total_tokens"]
                    if action == "ok":
                        server.served[h] += 1
                self._send(200, json.dumps(body).encode())

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # the default listen backlog (5) resets bursts of connections
            daemon_threads = True

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
