"""A tiny OpenAI-compatible chat server for the fast tests (stdlib ``http.server`` in a thread).

It is a test double for the network only: the llamacpp tier runs the same scenarios against the real
llama.cpp server. Answers are deterministic functions of (messages, seed, sample temperature), so a
resumed run and an uninterrupted run can be compared record for record.

Knobs: ``delay`` (seconds of "work" per request), ``reject_with_401`` (reply 401 and echo the key it
got, as some hosted APIs do, to test redaction), ``fail_first`` (HTTP status to return for the first
attempt at each distinct prompt, e.g. 500 or 429), ``retry_after`` (header value sent with those).
It records the peak number of requests in flight and every Authorization header it saw.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def answer_tokens(messages: list[dict], seed, temperature: float, max_tokens: int) -> list[str]:
    """The stub's deterministic answer, as a list of tokens (words with leading spaces)."""
    h = hashlib.sha256(json.dumps([messages, seed, temperature], sort_keys=True).encode()).hexdigest()
    last = messages[-1]["content"]
    words = ["Answer", f" {h[:6]}", " to"] + [f" {w}" for w in last.split()[:8]] + [" ."]
    return words[:max_tokens]


class StubServer:
    def __init__(self, delay: float = 0.0, reject_with_401: bool = False, fail_first: int | None = None,
                 retry_after: str | None = None) -> None:
        self.delay, self.reject_with_401 = delay, reject_with_401
        self.fail_first, self.retry_after = fail_first, retry_after
        self.lock = threading.Lock()
        self.in_flight = self.peak_in_flight = self.requests = 0
        self.auth_headers: list[str] = []
        self.seen_prompts: set[str] = set()
        self.request_times: list[float] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # keep test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with stub.lock:
                    stub.requests += 1
                    stub.in_flight += 1
                    stub.peak_in_flight = max(stub.peak_in_flight, stub.in_flight)
                    stub.auth_headers.append(self.headers.get("Authorization", ""))
                    stub.request_times.append(time.monotonic())
                try:
                    stub._handle(self, body)
                finally:
                    with stub.lock:
                        stub.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def _send(self, h: BaseHTTPRequestHandler, status: int, obj: dict, headers: dict | None = None) -> None:
        data = json.dumps(obj).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    def _handle(self, h: BaseHTTPRequestHandler, body: dict) -> None:
        if self.reject_with_401:
            key = h.headers.get("Authorization", "").removeprefix("Bearer ")
            self._send(h, 401, {"error": {"message": f"Incorrect API key provided: {key}", "type": "invalid_request_error"}})
            return
        msgs = body["messages"]
        prompt_key = json.dumps([msgs, body.get("seed")])
        if self.fail_first is not None:
            with self.lock:
                first = prompt_key not in self.seen_prompts
                self.seen_prompts.add(prompt_key)
            if first:
                hdr = {"Retry-After": self.retry_after} if self.retry_after else {}
                self._send(h, self.fail_first, {"error": {"message": "injected by stub"}}, hdr)
                return
        if self.delay:
            time.sleep(self.delay)
        toks = answer_tokens(msgs, body.get("seed"), body.get("temperature", 1.0), body.get("max_tokens", 16))
        choice: dict = {"index": 0, "message": {"role": "assistant", "content": "".join(toks)},
                        "finish_reason": "stop" if len(toks) < body.get("max_tokens", 16) else "length"}
        if body.get("logprobs"):
            k = body.get("top_logprobs", 0)
            content = []
            for i, t in enumerate(toks):
                alts = [{"token": t, "logprob": -0.5, "bytes": list(t.encode())}]
                alts += [{"token": f" alt{j}", "logprob": -1.5 - j, "bytes": list(f" alt{j}".encode())} for j in range(k - 1)]
                content.append({"token": t, "logprob": -0.5, "bytes": list(t.encode()), "top_logprobs": alts[:k]})
            choice["logprobs"] = {"content": content}
        prompt_tokens = sum(len(m["content"]) for m in msgs) // 4 + 3
        self._send(h, 200, {"id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()),
                            "model": body.get("model", "stub"), "choices": [choice],
                            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(toks),
                                      "total_tokens": prompt_tokens + len(toks)}})

    def __enter__(self) -> "StubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
