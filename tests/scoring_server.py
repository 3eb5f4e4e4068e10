"""A vLLM-format scoring server for the fast tests: real prompt log-probs from a real (tiny) HF model.

It answers ``POST /v1/completions`` the way vLLM's OpenAI server does for ``prompt_logprobs: k`` (the
documented shape: ``choices[0].prompt_logprobs`` = ``[None, {"<id>": {"logprob", "rank", "decoded_token"}},
...]``, the top ``k`` by rank plus the prompt token itself when it ranks lower), ``GET /v1/models`` and
``GET /version``. The numbers are the model's own log-softmax, so a served teacher reading them can be
held against the in-process teacher on the same weights. The llamacpp tier runs the same checks against
the real llama.cpp server.

Knobs: ``fail_after`` (answer that many completions, then 503 to every request: a server that died),
``delay`` (seconds per request). It counts requests and the peak in flight.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


def prompt_logprobs(model, ids: list[int], k: int) -> list:
    """vLLM's ``prompt_logprobs`` for ``ids`` under ``model``: entry i describes token i given tokens < i."""
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)  # (n, V)
    out: list = [None]
    for i in range(1, len(ids)):
        row = lp[i - 1]
        order = torch.argsort(row, descending=True)
        ranks = torch.empty_like(order)
        ranks[order] = torch.arange(1, len(order) + 1)
        entry = {str(int(t)): {"logprob": float(row[t]), "rank": int(ranks[t]), "decoded_token": f"<{int(t)}>"}
                 for t in order[:k]}
        tok = ids[i]
        entry.setdefault(str(tok), {"logprob": float(row[tok]), "rank": int(ranks[tok]), "decoded_token": f"<{tok}>"})
        out.append(entry)
    return out


class ScoringServer:
    def __init__(self, model, name: str = "teacher", fail_after: int | None = None, delay: float = 0.0):
        self.model, self.name = model.eval(), name
        self.fail_after, self.delay = fail_after, delay
        self.lock = threading.Lock()
        self.completions = self.in_flight = self.peak_in_flight = 0
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                if self.path.rstrip("/") == "/version":
                    srv._send(self, 200, {"version": "0.11.0-test"})
                elif self.path.rstrip("/") == "/v1/models":
                    srv._send(self, 200, {"object": "list", "data": [{"id": srv.name, "object": "model"}]})
                else:
                    srv._send(self, 404, {"error": {"message": "not found"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with srv.lock:
                    srv.in_flight += 1
                    srv.peak_in_flight = max(srv.peak_in_flight, srv.in_flight)
                try:
                    srv._complete(self, body)
                finally:
                    with srv.lock:
                        srv.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def _send(self, h, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _complete(self, h, body: dict) -> None:
        with self.lock:
            dead = self.fail_after is not None and self.completions >= self.fail_after
            if not dead:
                self.completions += 1
        if dead:
            self._send(h, 503, {"error": {"message": "server is down (test)"}})
            return
        if self.delay:
            time.sleep(self.delay)
        ids, k = body["prompt"], int(body.get("prompt_logprobs") or 0)
        with self.lock:  # one forward at a time (the tests run torch single-threaded)
            plp = prompt_logprobs(self.model, ids, k)
        choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": "length", "prompt_logprobs": plp}
        self._send(h, 200, {"id": "cmpl-test", "object": "text_completion", "created": int(time.time()),
                            "model": self.name, "choices": [choice],
                            "usage": {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}})

    def __enter__(self) -> "ScoringServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
