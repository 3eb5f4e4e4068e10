"""A fault-injecting HTTP/1.1 proxy (stdlib asyncio, in a background thread) for API-client tests.

It sits between the client and a real server and, for a seeded random ``fault_rate`` of requests,
misbehaves in one of these ways (``kinds``):

* ``"429"``: answers ``429 Too Many Requests`` with ``Retry-After`` itself (the server never sees it);
* ``"500"``: answers ``500 Internal Server Error`` itself;
* ``"drop"``: closes the connection (RST) before forwarding anything;
* ``"midbody"``: forwards, lets the server do the work, then sends the headers and only half the
  body and resets the connection (the costly case: a retry pays twice);
* ``"timeout"``: never answers; holds the connection until the client gives up (or ``hang_s``).
  It does not forward: a serial server (llama-cpp-python) would otherwise keep computing abandoned
  requests, and the queue behind them would time out too (a retry storm the test is not about).

Every other request is relayed unchanged. Each connection carries one request (the proxy answers
``Connection: close``), which the openai SDK's HTTP client handles transparently. ``stats`` counts
what happened (``forwarded`` = relayed intact).
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections import Counter

KINDS = ("429", "500", "drop", "midbody", "timeout")


def _with_close(head: bytes) -> bytes:
    """Replace any Connection header of an HTTP head (ending in CRLFCRLF) by ``Connection: close``."""
    lines = head.split(b"\r\n")
    kept = [ln for ln in lines[1:] if ln and not ln.lower().startswith(b"connection:")]
    return b"\r\n".join([lines[0], *kept, b"Connection: close", b"", b""])


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int, fault_rate: float = 0.3,
                 kinds: tuple[str, ...] = KINDS, seed: int = 0, retry_after: str = "1", hang_s: float = 60.0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.fault_rate, self.kinds = fault_rate, kinds
        self.rng = random.Random(seed)
        self.retry_after, self.hang_s = retry_after, hang_s
        self.stats: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def faults(self) -> int:
        return sum(v for k, v in self.stats.items() if k in KINDS)

    def _pick(self) -> str | None:
        with self._lock:
            if self.rng.random() < self.fault_rate:
                return self.rng.choice(self.kinds)
            return None

    async def _reply(self, writer: asyncio.StreamWriter, status: str, body: bytes, extra: str = "") -> None:
        writer.write((f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                      f"{extra}Connection: close\r\n\r\n").encode() + body)
        await writer.drain()

    async def _forward(self, head: bytes, body: bytes) -> bytes:
        up_r, up_w = await asyncio.open_connection(*self.upstream)
        try:
            up_w.write(_with_close(head) + body)
            await up_w.drain()
            return await up_r.read()  # until the server closes (we asked it to)
        finally:
            up_w.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            body = await reader.readexactly(length)
            kind = self._pick()
            with self._lock:
                self.stats[kind or "forwarded"] += 1
            if kind == "429":
                await self._reply(writer, "429 Too Many Requests",
                                  b'{"error": {"message": "rate limited (fault proxy)", "type": "rate_limit"}}',
                                  f"Retry-After: {self.retry_after}\r\n")
            elif kind == "500":
                await self._reply(writer, "500 Internal Server Error", b'{"error": {"message": "boom (fault proxy)"}}')
            elif kind == "drop":
                writer.transport.abort()
                return
            elif kind == "timeout":
                try:  # the client closing its end (EOF) means it timed out
                    await asyncio.wait_for(reader.read(), self.hang_s)
                except asyncio.TimeoutError:
                    pass
                writer.transport.abort()
                return
            else:
                raw = await self._forward(head, body)
                if kind == "midbody":
                    cut = raw.find(b"\r\n\r\n") + 4
                    writer.write(raw[: cut + max(1, (len(raw) - cut) // 2)])
                    await writer.drain()
                    writer.transport.abort()
                    return
                cut = raw.find(b"\r\n\r\n") + 4
                writer.write(_with_close(raw[:cut]) + raw[cut:])
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            if not writer.transport.is_closing():
                writer.close()

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop)
        self._server = fut.result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        async def _stop() -> None:
            self._server.close()
            for task in [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
                task.cancel()

        asyncio.run_coroutine_threadsafe(_stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
