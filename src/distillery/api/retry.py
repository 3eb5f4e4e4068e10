"""Which failures to retry, how long to wait, and how to describe a failure without leaking the key.

The openai SDK's own retries are switched off (``max_retries=0``) so that every attempt passes through
our rate limiter and is counted; this module decides instead:

* retried: HTTP 408, 409, 429 and 5xx, timeouts, dropped connections (``APIConnectionError``), and a
  200 whose body is not a usable chat completion;
* fatal for the whole run (every request would fail the same way): 401, 403, 404 (bad key, no access,
  unknown model or wrong ``base_url``);
* anything else (400, 413, 422: e.g. a prompt longer than the context) fails just that record.

Back-off: attempt ``a`` (0-based) waits ``d/2 + U(0, d/2)`` with ``d = min(backoff_max, base * 2**a)``
(exponential with "equal jitter": never zero, never synchronised). A server's ``Retry-After``
(or ``retry-after-ms``) is a floor: we wait that long plus up to 10% jitter.
"""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass

RETRIABLE_STATUS = {408, 409, 429}
FATAL_STATUS = {401, 403, 404}


@dataclass(frozen=True)
class Verdict:
    """How to treat one failed attempt."""

    retriable: bool
    fatal: bool
    reason: str
    retry_after: float | None = None
    status: int | None = None


def parse_retry_after(headers) -> float | None:
    """Seconds asked for by ``retry-after-ms`` / ``Retry-After`` (seconds or an HTTP date), or None."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def classify(exc: BaseException) -> Verdict:
    """Map an exception from the openai SDK (or our response checks) to a :class:`Verdict`."""
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return Verdict(True, False, "timeout")
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc.__context__
        detail = f" ({type(cause).__name__})" if cause is not None else ""
        return Verdict(True, False, f"connection error{detail}")
    if isinstance(exc, openai.APIStatusError):
        code = exc.status_code
        reason = f"HTTP {code}: {_short(exc.message)}"
        after = parse_retry_after(exc.response.headers)
        if code in RETRIABLE_STATUS or code >= 500:
            return Verdict(True, False, reason, after, code)
        return Verdict(False, code in FATAL_STATUS, reason, None, code)
    if isinstance(exc, (openai.APIResponseValidationError, BadResponse)):
        return Verdict(True, False, f"bad response: {_short(str(exc))}")
    return Verdict(False, False, f"{type(exc).__name__}: {_short(str(exc))}")


class BadResponse(Exception):
    """A 2xx reply that is not a usable chat completion (no choices, no message...)."""


@dataclass
class Backoff:
    """Exponential back-off with equal jitter; ``Retry-After`` is honoured as a floor."""

    base: float = 0.5
    cap: float = 60.0
    max_retry_after: float = 600.0
    rng: random.Random | None = None

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        rng = self.rng or random
        d = min(self.cap, self.base * (2 ** attempt))
        wait = d / 2 + rng.uniform(0, d / 2)
        if retry_after is not None:
            wait = max(wait, retry_after * (1.0 + rng.uniform(0, 0.1)))
        return wait


def redact(text: str, secret: str | None) -> str:
    """Remove the secret, and any 8+ character piece of it a server might echo, from ``text``."""
    if not secret or not text:
        return text
    text = text.replace(secret, "[REDACTED]")
    if len(secret) >= 16:
        # Hosted APIs echo keys partially ("sk-abc...wxyz"): scrub every 8-char window of the key.
        for i in range(len(secret) - 7):
            piece = secret[i:i + 8]
            if piece in text:
                text = text.replace(piece, "[REDACTED]")
    return text
