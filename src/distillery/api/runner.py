"""`generate_dataset`: prompts -> served teacher -> durable chat data set, exactly once per record.

Flow (read top to bottom in :func:`agenerate_dataset`):

1. read prompts, expand to work items with stable ids (:mod:`.prompts`);
2. open the output under a lock, read the ids already there, cut a torn last line (:mod:`.store`);
3. ``concurrency`` workers pull the missing items; each attempt waits for the RPM/TPM limiter
   (:mod:`.limits`), calls ``chat.completions.create`` on an ``AsyncOpenAI`` client with the SDK's
   retries off, and on failure either backs off and retries or records the failure (:mod:`.retry`);
4. a finished record is one fsync'd JSONL line; then the summary is written next to the output.

Output record (one JSON line; a chat record that ``distill`` reads as data)::

    {"id": "...", "messages": [..prompt.., {"role": "assistant", "content": "..."}],
     "sample_index": 0, "model": "...", "finish_reason": "stop",
     "usage": {"prompt_tokens": 31, "completion_tokens": 64},
     "sampling": {...}, "source": "prompts.jsonl:12",
     "logprobs": [{"token": "Hello", "logprob": -0.1, "top_logprobs": [{"token": ..., "logprob": ...}, ...]}, ...]}

``logprobs`` is present only when the recipe asks for it; ``bytes`` is kept on a token only when it
differs from the UTF-8 encoding of ``token`` (partial characters).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..errors import DistilleryError
from .config import ApiConfig
from .limits import RateLimiter, estimate_tokens
from .prompts import WorkItem, plan, read_prompts
from .retry import Backoff, BadResponse, classify, redact
from .store import DatasetStore

log = logging.getLogger("distillery.api")
NO_KEY = "no-key"  # sent to loopback servers when the key variable is unset (llama.cpp needs none)


def resolve_api_key(cfg: ApiConfig) -> str:
    """The key from ``$api_key_env``; loopback servers get a placeholder when it is unset."""
    key = os.environ.get(cfg.api_key_env)
    if key:
        return key
    def loopback(url: str) -> bool:
        host = urlparse(url).hostname or ""
        try:
            return host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    if all(loopback(u) for u in cfg.base_urls()):
        return NO_KEY
    named = cfg.api_key_env if cfg.api_key_env.isupper() else "named by api.api_key_env"
    raise DistilleryError(f"api.api_key_env: environment variable {named} is not set "
                          f"(it must hold the API key for {', '.join(cfg.base_urls())})")


def _token_entry(t: Any, with_top: bool) -> dict:
    d: dict[str, Any] = {"token": t.token, "logprob": float(t.logprob)}
    b = getattr(t, "bytes", None)
    if b is not None and bytes(b) != t.token.encode("utf-8"):
        d["bytes"] = list(b)
    if with_top:
        d["top_logprobs"] = [_token_entry(x, False) for x in (t.top_logprobs or [])]
    return d


def to_record(item: WorkItem, resp: Any, cfg: ApiConfig) -> dict:
    """Turn one chat completion into an output record; raise :class:`BadResponse` if it is unusable."""
    choices = getattr(resp, "choices", None)
    if not choices:
        raise BadResponse("no choices in the reply")
    choice = choices[0]
    msg = getattr(choice, "message", None)
    text = getattr(msg, "content", None)
    if not isinstance(text, str):
        raise BadResponse(f"reply has no text content (finish_reason={getattr(choice, 'finish_reason', None)})")
    usage = getattr(resp, "usage", None)
    rec: dict[str, Any] = {
        "id": item.id,
        "messages": item.prompt.as_messages() + [{"role": "assistant", "content": text}],
        "sample_index": item.sample_index,
        "model": cfg.model,
        "finish_reason": choice.finish_reason,
        "usage": {"prompt_tokens": int(getattr(usage, "prompt_tokens", 0) or 0),
                  "completion_tokens": int(getattr(usage, "completion_tokens", 0) or 0)},
        "sampling": cfg.sampling.id_fields(),
        "source": item.prompt.source,
    }
    if cfg.sampling.logprobs:
        lp = getattr(choice, "logprobs", None)
        content = getattr(lp, "content", None) if lp is not None else None
        if content is None:
            raise BadResponse("logprobs were requested but the reply has none (does the server support them?)")
        rec["logprobs"] = [_token_entry(t, cfg.sampling.top_logprobs > 0) for t in content]
    return rec


def request_kwargs(item: WorkItem, cfg: ApiConfig) -> dict:
    """Arguments of ``chat.completions.create`` for one work item (always one choice per request)."""
    s = cfg.sampling
    kw: dict[str, Any] = {"model": cfg.model, "messages": item.prompt.as_messages(), "n": 1,
                          "temperature": s.sample_temperature, "top_p": s.top_p, "max_tokens": s.max_tokens}
    if s.stop:
        kw["stop"] = list(s.stop)
    if s.seed is not None:
        kw["seed"] = s.seed + item.sample_index
    if s.logprobs:
        kw["logprobs"] = True
        if s.top_logprobs:
            kw["top_logprobs"] = s.top_logprobs
    if s.extra_body:
        kw["extra_body"] = dict(s.extra_body)
    return kw


class _FatalApiError(Exception):
    """Every request would fail (bad key, unknown model, wrong URL): stop the run."""


class _Run:
    """Counters and shared state of one generation run."""

    def __init__(self, cfg: ApiConfig, store: DatasetStore, limiter: RateLimiter, backoff: Backoff, key: str) -> None:
        self.cfg, self.store, self.limiter, self.backoff, self.key = cfg, store, limiter, backoff, key
        self.done = self.failed = self.requests = self.retries = 0
        self.tokens_in = self.tokens_out = 0
        self.reasons: Counter[str] = Counter()

    async def produce(self, clients: list[Any], item: WorkItem) -> None:
        """Get one record: attempt, back off, retry; write it or record its failure.

        Attempts are spread over ``clients`` (one per server) round-robin, so a retry goes elsewhere.
        """
        cfg = self.cfg
        kw = request_kwargs(item, cfg)
        est = estimate_tokens(kw["messages"], cfg.sampling.max_tokens)
        attempt = 0
        while True:
            ticket = await self.limiter.acquire(est)
            attempt += 1
            client = clients[self.requests % len(clients)]
            self.requests += 1
            try:
                resp = await asyncio.wait_for(client.chat.completions.create(**kw), cfg.timeout + 5.0)
                rec = to_record(item, resp, cfg)
            except asyncio.TimeoutError:
                verdict_reason, retriable, fatal, after = "timeout", True, False, None
                self.limiter.settle(ticket, ticket.reserved)
            except Exception as exc:  # noqa: BLE001 - every failure is classified, none escapes silently
                v = classify(exc)
                verdict_reason, retriable, fatal, after = v.reason, v.retriable, v.fatal, v.retry_after
                self.limiter.settle(ticket, 0 if v.status == 429 else ticket.reserved)  # a 429 used no tokens
            else:
                self.limiter.settle(ticket, rec["usage"]["prompt_tokens"] + rec["usage"]["completion_tokens"])
                self.store.write_record(rec)
                self.done += 1
                self.tokens_in += rec["usage"]["prompt_tokens"]
                self.tokens_out += rec["usage"]["completion_tokens"]
                return
            reason = redact(verdict_reason, self.key)
            if fatal:
                raise _FatalApiError(reason)
            too_long = after is not None and after > cfg.max_retry_after
            if retriable and not too_long and attempt <= cfg.max_retries:
                self.retries += 1
                log.debug("retry %d for %s: %s", attempt, item.id, reason)
                await asyncio.sleep(self.backoff.delay(attempt - 1, after))
                continue
            if too_long:
                reason += f" (Retry-After {after:.0f}s > max_retry_after)"
            elif retriable:
                reason += f" (gave up after {attempt} attempts)"
            self.store.write_failure(item.id, reason, attempt, item.prompt.source)
            self.failed += 1
            self.reasons[reason.split(":")[0].split(" (")[0]] += 1
            return


async def _progress(run: _Run, total: int, t0: float) -> None:
    while True:
        await asyncio.sleep(run.cfg.progress_every)
        el = time.monotonic() - t0
        log.info("generate: %d/%d done, %d failed, %d retries, %.2f records/s",
                 run.done, total, run.failed, run.retries, run.done / max(el, 1e-9))


def _make_clients(cfg: ApiConfig, key: str) -> list[Any]:
    import openai

    return [openai.AsyncOpenAI(api_key=key, base_url=url, max_retries=0, timeout=cfg.timeout) for url in cfg.base_urls()]


async def agenerate_dataset(cfg: ApiConfig) -> dict:
    """Async body of :func:`generate_dataset` (use this when an event loop is already running)."""
    t0 = time.monotonic()
    key = resolve_api_key(cfg)
    sampling = cfg.sampling.id_fields()
    items, dup_prompts = plan(read_prompts(cfg.prompts, cfg.system_prompt), cfg.model, sampling, cfg.sampling.n)
    with DatasetStore(cfg.output, cfg.failures_path(), fsync=cfg.fsync) as store:
        if store.torn_bytes:
            log.warning("generate: cut a torn last line (%d bytes) left by an interrupted run", store.torn_bytes)
        prev_failed = set(store.previous_failures)
        store.start_failures()
        skipped = sum(1 for it in items if it.id in store.done_ids)
        held_back = set() if cfg.retry_failed else prev_failed
        todo = [it for it in items if it.id not in store.done_ids and it.id not in held_back]
        run = _Run(cfg, store, RateLimiter(cfg.rpm, cfg.tpm),
                   Backoff(cfg.backoff_base, cfg.backoff_max, cfg.max_retry_after), key)
        log.info("generate: %d records planned, %d already present, %d to do", len(items), skipped, len(todo))
        clients = _make_clients(cfg, key)
        queue = iter(todo)

        async def worker() -> None:
            for item in queue:  # shared iterator: each item goes to exactly one worker
                await run.produce(clients, item)

        ticker = asyncio.create_task(_progress(run, len(todo), t0)) if cfg.progress_every > 0 else None
        fatal: str | None = None
        try:
            workers = [asyncio.create_task(worker()) for _ in range(min(cfg.concurrency, max(1, len(todo))))]
            try:
                await asyncio.gather(*workers)
            except _FatalApiError as exc:
                fatal = str(exc)
            finally:  # on a fatal reply, an unwritable disk or Ctrl-C: stop every worker before closing
                for w in workers:
                    w.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
        finally:
            if ticker is not None:
                ticker.cancel()
            for c in clients:
                await c.close()
            still_failed = store.finish_failures()
        summary = _summary(cfg, run, len(items), skipped, dup_prompts, len(held_back & {i.id for i in items}),
                           len(store.done_ids), len(still_failed), store.torn_bytes, time.monotonic() - t0)
        summary["fatal_error"] = fatal
    _write_summary(cfg, summary, key)
    if fatal:
        raise DistilleryError(f"api: {', '.join(cfg.base_urls())} refused the run: {fatal}")
    return summary


def _summary(cfg: ApiConfig, run: _Run, planned: int, skipped: int, dup_prompts: int, held_back: int,
             in_output: int, still_failed: int, torn: int, elapsed: float) -> dict:
    cost = None
    if cfg.price_in_per_1m is not None or cfg.price_out_per_1m is not None:
        cost = round(run.tokens_in * (cfg.price_in_per_1m or 0.0) / 1e6
                     + run.tokens_out * (cfg.price_out_per_1m or 0.0) / 1e6, 6)
    return {
        "output": str(cfg.output), "failures_file": cfg.failures_path(),
        "planned": planned, "done": run.done, "failed": run.failed, "skipped": skipped,
        "held_back_failed": held_back, "duplicate_prompts": dup_prompts,
        "records_in_output": in_output, "failures_outstanding": still_failed,
        "requests": run.requests, "retries": run.retries, "failure_reasons": dict(run.reasons),
        "tokens_in": run.tokens_in, "tokens_out": run.tokens_out, "estimated_cost": cost,
        "elapsed_s": round(elapsed, 3), "records_per_s": round(run.done / max(elapsed, 1e-9), 3),
        "rate_limit_wait_s": round(run.limiter.waited_s, 3), "torn_bytes_dropped": torn,
    }


def _write_summary(cfg: ApiConfig, summary: dict, key: str) -> None:
    path = Path(cfg.summary_path())
    text = redact(json.dumps(summary, indent=2), key)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)


def generate_dataset(cfg: ApiConfig | dict, **overrides: Any) -> dict:
    """Generate (or finish generating) the chat data set a recipe describes; return the summary.

    ``cfg`` is an :class:`ApiConfig` or a dict of its fields; keyword ``overrides`` replace top-level
    fields (e.g. ``output=...``, ``prompts=[...]``). Safe to call again after any interruption: records
    already in the output are skipped, failed ones retried. Raises :class:`DistilleryError` on a bad
    recipe, unreadable prompts, or when the server refuses every request (401/403/404).
    """
    from pydantic import ValidationError

    from .config import validation_message

    data = cfg.model_dump() if isinstance(cfg, ApiConfig) else dict(cfg)
    data.update(overrides)
    try:
        config = ApiConfig.model_validate(data)
    except ValidationError as err:
        raise DistilleryError(validation_message(err, "api")) from None
    return asyncio.run(agenerate_dataset(config))
