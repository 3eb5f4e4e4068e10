"""Fast unit tests of the API teacher's parts: config, prompts + ids, limiter, retry policy, store."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from distillery.api import ApiConfig, load_api_config, record_id
from distillery.api.limits import RateLimiter, estimate_tokens
from distillery.api.prompts import plan, read_prompts
from distillery.api.retry import Backoff, classify, parse_retry_after, redact
from distillery.api.store import DatasetStore, scan_jsonl
from distillery.errors import DistilleryError

SAMPLING = ApiConfig().sampling.id_fields()


# ------------------------------------------------------------------ config
def test_config_rejects_unknown_key_and_never_echoes_a_pasted_key(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("api:\n  model: m\n  sampling:\n    temprature: 0.5\n")
    with pytest.raises(DistilleryError, match=r"api\.sampling\.temprature' is not a known setting"):
        load_api_config(p)
    p.write_text("api_key_env: sk-live-abcdef0123456789\n")
    with pytest.raises(DistilleryError) as err:
        load_api_config(p)
    assert "api_key_env" in str(err.value) and "sk-live" not in str(err.value)


def test_config_overrides_with_or_without_api_prefix(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("teacher: {kind: hf}\napi:\n  model: m\n")
    cfg = load_api_config(p, ["api.concurrency=3", "sampling.max_tokens=7"])
    assert (cfg.model, cfg.concurrency, cfg.sampling.max_tokens) == ("m", 3, 7)
    assert cfg.failures_path() == cfg.output + ".failures"


# ------------------------------------------------------------------ prompts and ids
def test_record_id_is_pinned_and_depends_on_content_settings_and_sample_only():
    msgs = [{"role": "user", "content": "Hi"}]
    rid = record_id(msgs, "teacher", SAMPLING, 0)
    # Pinned: a change here breaks resuming data sets written by earlier versions.
    assert rid == record_id([{"role": "user", "content": "Hi"}], "teacher", dict(SAMPLING), 0)
    assert rid == "78479a90bac6352e56fb4d00dd13170a"
    other = [record_id(msgs, "teacher", SAMPLING, 1), record_id(msgs, "other", SAMPLING, 0),
             record_id([{"role": "user", "content": "Hi!"}], "teacher", SAMPLING, 0),
             record_id(msgs, "teacher", {**SAMPLING, "sample_temperature": 0.0}, 0)]
    assert len({rid, *other}) == 5
    cfg_n1, cfg_n4 = ApiConfig(), ApiConfig(sampling={"n": 4})
    assert cfg_n1.sampling.id_fields() == cfg_n4.sampling.id_fields()  # raising n keeps existing ids


def test_read_prompts_formats_and_errors(tmp_path):
    j = tmp_path / "p.jsonl"
    j.write_text(json.dumps({"prompt": "a"}) + "\n\n"
                 + json.dumps({"messages": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "x"}]}) + "\n")
    t = tmp_path / "p.txt"
    t.write_text("c\n\nd\n")
    got = list(read_prompts([str(j), str(t)], system_prompt="S"))
    assert [p.as_messages()[-1]["content"] for p in got] == ["a", "b", "c", "d"]
    assert all(p.messages[0] == ("system", "S") for p in got)
    assert got[1].source == f"{j}:3" and len(got[1].messages) == 2  # trailing assistant turn dropped
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n{not json\n")
    with pytest.raises(DistilleryError, match=r"bad\.jsonl:2: not valid JSON"):
        list(read_prompts([str(bad)]))
    bad.write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(DistilleryError, match=r"bad\.jsonl:1: messages\[0\]"):
        list(read_prompts([str(bad)]))
    with pytest.raises(DistilleryError, match="does not exist"):
        list(read_prompts([str(tmp_path / "missing.txt")]))


def test_plan_expands_n_and_drops_repeated_prompts(tmp_path):
    t = tmp_path / "p.txt"
    t.write_text("a\nb\na\n")
    items, dups = plan(read_prompts([str(t)]), "m", SAMPLING, 3)
    assert len(items) == 6 and dups == 3
    assert len({i.id for i in items}) == 6
    assert [i.sample_index for i in items] == [0, 1, 2, 0, 1, 2]


# ------------------------------------------------------------------ rate limiter (fake clock)
class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, s: float) -> None:
        self.now += s


def test_rpm_paces_request_starts():
    clock = FakeClock()
    lim = RateLimiter(rpm=60, clock=clock, sleep=clock.sleep)

    async def go():
        starts = []
        for _ in range(5):
            await lim.acquire()
            starts.append(clock.now)
        return starts

    assert asyncio.run(go()) == pytest.approx([0, 1, 2, 3, 4])


def test_tpm_bucket_reserves_worst_case_and_refunds_actual_usage():
    clock = FakeClock()
    lim = RateLimiter(tpm=600, clock=clock, sleep=clock.sleep)  # refills 10 tokens/s

    async def go():
        tickets = [await lim.acquire(200) for _ in range(3)]  # the whole minute's budget, at once
        assert clock.now == 0
        t = await lim.acquire(100)  # needs 100 more tokens = 10 s of refill
        assert clock.now == pytest.approx(10)
        lim.settle(tickets[0], 50)  # the first request used 50, not 200: 150 come back
        await lim.acquire(150)
        assert clock.now == pytest.approx(10)
        lim.settle(t, 400)  # under-estimated: the bucket goes negative and delays the next request
        await lim.acquire(10)
        assert clock.now == pytest.approx(10 + 31)
        big = await lim.acquire(5000)  # larger than the bucket: waits for a full bucket, then goes
        return big

    asyncio.run(go())
    assert estimate_tokens([{"role": "user", "content": "x" * 40}], 16) == 10 + 4 + 16


# ------------------------------------------------------------------ retry policy
def test_backoff_is_exponential_with_jitter_and_honours_retry_after():
    b = Backoff(base=1.0, cap=8.0, rng=random.Random(0))
    for attempt, d in enumerate([1, 2, 4, 8, 8]):
        waits = [b.delay(attempt) for _ in range(200)]
        assert d / 2 <= min(waits) and max(waits) <= d and max(waits) - min(waits) > d / 4
    assert all(30 <= b.delay(0, retry_after=30) <= 33 for _ in range(50))


def test_parse_retry_after_forms():
    assert parse_retry_after({"retry-after": "3"}) == 3
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert 55 < parse_retry_after({"retry-after": _http_date(60)}) <= 60
    assert parse_retry_after({"retry-after": "soon"}) is None and parse_retry_after({}) is None


def _http_date(seconds_ahead: float) -> str:
    import email.utils
    import time

    return email.utils.formatdate(time.time() + seconds_ahead, usegmt=True)


def _status_error(code: int, headers: dict | None = None):
    import httpx2
    import openai

    req = httpx2.Request("POST", "http://127.0.0.1/v1/chat/completions")
    resp = httpx2.Response(code, headers=headers or {}, request=req)
    cls = {429: openai.RateLimitError, 401: openai.AuthenticationError, 400: openai.BadRequestError}.get(code, openai.APIStatusError)
    if code >= 500:
        cls = openai.InternalServerError
    return cls(f"Error code: {code}", response=resp, body=None)


def test_classify_retries_transient_failures_only():
    import httpx2
    import openai

    req = httpx2.Request("POST", "http://x")
    v = classify(_status_error(429, {"retry-after": "2"}))
    assert (v.retriable, v.fatal, v.retry_after, v.status) == (True, False, 2.0, 429)
    assert classify(_status_error(503)).retriable and classify(_status_error(408)).retriable
    assert classify(openai.APITimeoutError(req)).retriable
    assert classify(openai.APIConnectionError(request=req)).retriable
    bad = classify(_status_error(400))
    assert not bad.retriable and not bad.fatal and "HTTP 400" in bad.reason
    assert classify(_status_error(401)).fatal
    assert not classify(ValueError("x")).retriable


def test_redact_removes_whole_and_partial_keys():
    key = "sk-proj-0123456789abcdefXYZ"
    assert key not in redact(f"bad key {key}!", key)
    assert "89abcdef" not in redact("Incorrect API key provided: sk-proj-****89abcdefXYZ", key)
    assert redact("nothing here", key) == "nothing here"


# ------------------------------------------------------------------ durable store
def test_store_cuts_torn_tail_and_refuses_corrupt_middle_line(tmp_path):
    out = tmp_path / "d.jsonl"
    out.write_text('{"id": "a", "messages": []}\n{"id": "b", "mess')
    with DatasetStore(out, tmp_path / "d.f") as st:
        assert st.done_ids == {"a"} and st.torn_bytes == len('{"id": "b", "mess')
        st.start_failures()
        st.write_record({"id": "c", "messages": []})
    recs, torn = scan_jsonl(out, repair=False)
    assert [r["id"] for r in recs] == ["a", "c"] and torn == 0
    out.write_text('{"id": "a"}\n{broken\n{"id": "c"}\n')
    with pytest.raises(DistilleryError, match=r"d\.jsonl:2: corrupt line"):
        DatasetStore(out, tmp_path / "d.f")


@pytest.mark.parametrize("text", ['{"title": "my notes"}',  # one JSON object, no newline: was emptied
                                  "line one\nline two",  # plain text: its last line was cut before the refusal
                                  '{"id": "a", "messages": []}\nnot a record, no newline'])
def test_store_never_cuts_a_file_that_is_not_its_own(tmp_path, text):
    """``api.output`` naming a file of the user's: refused with one line, and not one byte of it cut."""
    out = tmp_path / "mine.jsonl"
    out.write_text(text)
    with pytest.raises(DistilleryError, match=r"mine\.jsonl(:1: corrupt line|: its last line .* is not a record)"):
        DatasetStore(out, tmp_path / "d.f")
    assert out.read_text() == text


def test_store_is_locked_to_one_run_and_compacts_failures(tmp_path):
    out = tmp_path / "d.jsonl"
    with DatasetStore(out, tmp_path / "d.f") as st:
        with pytest.raises(DistilleryError, match="another `distillery generate`"):
            DatasetStore(out, tmp_path / "d.f")
        st.start_failures()
        st.write_failure("x", "HTTP 500", 3, "p:1")
        st.write_failure("y", "HTTP 500", 3, "p:2")
        st.write_failure("x", "timeout", 4, "p:1")
        st.write_record({"id": "y"})
        left = st.finish_failures()
    assert list(left) == ["x"] and left["x"]["reason"] == "timeout"
    with DatasetStore(out, tmp_path / "d.f") as st:  # lock released on close
        assert set(st.previous_failures) == {"x"}


def test_a_key_pasted_as_the_variable_name_is_refused_without_echo(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("api_key_env: AIzaSyD3mo0Key0123456789abcdefXYZ\n")  # alphanumeric, like Gemini keys
    with pytest.raises(DistilleryError) as err:
        load_api_config(p)
    assert "looks like an API key" in str(err.value) and "AIzaSy" not in str(err.value)
    assert ApiConfig(api_key_env="GEMINI_API_KEY").api_key_env == "GEMINI_API_KEY"
