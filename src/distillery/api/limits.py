"""Requests-per-minute and tokens-per-minute limits for an asyncio client.

* **RPM** is enforced by pacing: request starts are at least ``60 / rpm`` seconds apart. No bursts,
  so a server that measures its limit over a few seconds (as hosted APIs do) is not tripped either.
* **TPM** is a token bucket holding at most one minute of tokens (``tpm``), refilled at ``tpm / 60``
  per second. A request reserves its worst case up front (prompt estimate + ``max_tokens``), and
  :meth:`RateLimiter.settle` later refunds the difference to the actual usage (or charges more: the
  bucket may go negative, which delays the next requests). A single request larger than the bucket
  waits for a full bucket and then goes.

Every attempt (retries included) passes :meth:`RateLimiter.acquire`. Waiters are served in arrival
order (one ``asyncio.Lock``). ``clock`` and ``sleep`` are injectable so tests run on a fake clock.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable


@dataclass
class Ticket:
    """What one attempt reserved from the token bucket."""

    reserved: float


class RateLimiter:
    """RPM pacing + TPM token bucket; ``None`` disables either."""

    def __init__(self, rpm: float | None = None, tpm: float | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.rpm, self.tpm = rpm, tpm
        self._clock, self._sleep = clock, sleep
        self._next_start = float("-inf")  # earliest time the next request may start (RPM)
        self._tokens = float(tpm) if tpm else 0.0  # bucket level (TPM)
        self._stamp = clock()
        self._lock = asyncio.Lock()
        self.waited_s = 0.0  # total time spent waiting here (reported in the summary)

    def _refill(self, now: float) -> None:
        if self.tpm:
            self._tokens = min(float(self.tpm), self._tokens + (now - self._stamp) * self.tpm / 60.0)
        self._stamp = now

    def _wait_needed(self, now: float, need: float) -> float:
        wait = 0.0
        if self.rpm:
            wait = max(wait, self._next_start - now)
        if self.tpm:
            target = min(need, float(self.tpm))  # an oversize request waits for a full bucket only
            if self._tokens < target:
                wait = max(wait, (target - self._tokens) * 60.0 / self.tpm)
        return wait

    async def acquire(self, tokens: float = 0.0) -> Ticket:
        """Wait until one more request of about ``tokens`` tokens fits both limits, then reserve it."""
        async with self._lock:
            while True:
                now = self._clock()
                self._refill(now)
                wait = self._wait_needed(now, tokens)
                if wait <= 1e-9:
                    break
                self.waited_s += wait
                await self._sleep(wait)
            if self.rpm:
                self._next_start = max(now, self._next_start) + 60.0 / self.rpm
            if self.tpm:
                self._tokens -= tokens
            return Ticket(reserved=tokens if self.tpm else 0.0)

    def settle(self, ticket: Ticket, actual_tokens: float) -> None:
        """Replace the reservation by what the request really used (0 for a request that failed early)."""
        if self.tpm:
            self._refill(self._clock())
            self._tokens = min(float(self.tpm), self._tokens + ticket.reserved - actual_tokens)
            ticket.reserved = actual_tokens


def estimate_tokens(messages: list[dict[str, str]], max_tokens: int) -> int:
    """Worst-case tokens of one request: ~4 characters per prompt token, 4 per message, plus ``max_tokens``."""
    chars = sum(len(m["content"]) for m in messages)
    return chars // 4 + 4 * len(messages) + max_tokens
