"""Fast end-to-end tests of `generate_dataset` against the in-process stub server (+ the fault proxy).

The same scenarios run against the real llama.cpp server in ``test_api_llamacpp.py`` (slow tier).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distillery.api import generate_dataset
from distillery.errors import DistilleryError
from fault_proxy import FaultProxy
from openai_stub import StubServer

KEY_ENV = "DISTILLERY_TEST_API_KEY"
SECRET = "sk-test-9f8e7d6c5b4a39281706SECRET"


def write_prompts(path: Path, n: int, start: int = 0) -> Path:
    with path.open("a") as fh:
        for i in range(start, start + n):
            fh.write(json.dumps({"prompt": f"Question {i}: what is {i} times {i + 1}?"}) + "\n")
    return path


def base_cfg(tmp: Path, url: str, **kw) -> dict:
    cfg = {"base_url": url, "model": "stub", "api_key_env": KEY_ENV, "prompts": [str(tmp / "prompts.jsonl")],
           "output": str(tmp / "out" / "data.jsonl"), "concurrency": 4, "timeout": 2.0, "backoff_base": 0.02,
           "backoff_max": 0.2, "progress_every": 0,
           "sampling": {"max_tokens": 12, "n": 2, "seed": 7, "logprobs": True, "top_logprobs": 3}}
    cfg.update(kw)
    return cfg


def read_out(tmp: Path) -> list[dict]:
    p = tmp / "out" / "data.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def assert_no_secret_anywhere(root: Path) -> int:
    """Grep every file under ``root`` (bytes) for the key and its 8+ char pieces; return files checked."""
    files = [p for p in root.rglob("*") if p.is_file()]
    for p in files:
        data = p.read_bytes()
        assert SECRET.encode() not in data, p
        assert SECRET[-12:].encode() not in data, p
    return len(files)


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def test_generates_a_chat_dataset_with_logprobs_and_summary(tmp_path):
    write_prompts(tmp_path / "prompts.jsonl", 15)
    with StubServer() as stub:
        s = generate_dataset(base_cfg(tmp_path, stub.base_url, price_in_per_1m=2.0, price_out_per_1m=8.0))
    recs = read_out(tmp_path)
    assert (s["planned"], s["done"], s["failed"], s["skipped"], len(recs)) == (30, 30, 0, 0, 30)
    assert len({r["id"] for r in recs}) == 30
    r = recs[0]
    assert [m["role"] for m in r["messages"]] == ["user", "assistant"] and r["messages"][1]["content"].startswith("Answer")
    assert len(r["logprobs"]) == r["usage"]["completion_tokens"] and len(r["logprobs"][0]["top_logprobs"]) == 3
    assert s["tokens_in"] == sum(x["usage"]["prompt_tokens"] for x in recs)
    assert s["tokens_out"] == sum(x["usage"]["completion_tokens"] for x in recs)
    assert s["estimated_cost"] == pytest.approx((s["tokens_in"] * 2 + s["tokens_out"] * 8) / 1e6)
    assert json.loads((tmp_path / "out" / "data.jsonl.summary.json").read_text())["done"] == 30
    assert {a.removeprefix("Bearer ") for a in stub.auth_headers} == {SECRET}  # the key was really sent...
    assert assert_no_secret_anywhere(tmp_path) >= 4  # ...and written nowhere


def test_concurrency_is_bounded(tmp_path):
    write_prompts(tmp_path / "prompts.jsonl", 12)
    with StubServer(delay=0.1) as stub:
        generate_dataset(base_cfg(tmp_path, stub.base_url, concurrency=3))
    assert stub.peak_in_flight == 3


def test_rpm_limit_paces_requests(tmp_path):
    write_prompts(tmp_path / "prompts.jsonl", 3)
    with StubServer() as stub:
        generate_dataset(base_cfg(tmp_path, stub.base_url, rpm=600))  # >= 0.1 s apart
    assert len(stub.request_times) == 6 and stub.request_times[-1] - stub.request_times[0] >= 0.45


def test_faults_through_proxy_every_record_exactly_once(tmp_path):
    write_prompts(tmp_path / "prompts.jsonl", 25)
    with StubServer() as stub, FaultProxy("127.0.0.1", stub.port, fault_rate=0.35, seed=3, retry_after="0.05") as px:
        s = generate_dataset(base_cfg(tmp_path, px.base_url, timeout=1.0))
    recs = read_out(tmp_path)
    assert px.faults / sum(px.stats.values()) >= 0.2 and len(set(px.stats) - {"forwarded"}) == 5, px.stats
    assert (s["done"], s["failed"], len(recs), len({r["id"] for r in recs})) == (50, 0, 50, 50)
    assert s["retries"] >= px.faults and s["requests"] == 50 + s["retries"]
    assert assert_no_secret_anywhere(tmp_path) >= 4


def test_retry_after_is_honoured(tmp_path):
    write_prompts(tmp_path / "prompts.jsonl", 1)
    with StubServer(fail_first=429, retry_after="0.6") as stub:
        s = generate_dataset(base_cfg(tmp_path, stub.base_url, sampling={"max_tokens": 4}))
    assert s["done"] == 1 and s["retries"] == 1
    assert stub.request_times[1] - stub.request_times[0] >= 0.6


def test_exhausted_retries_are_recorded_then_retried_on_rerun(tmp_path):
    write_prompts(tmp_path / "prompts.jsonl", 4)
    with StubServer(fail_first=500) as stub:
        cfg = base_cfg(tmp_path, stub.base_url, max_retries=0)
        s1 = generate_dataset(cfg)
        fails = [json.loads(x) for x in (tmp_path / "out" / "data.jsonl.failures").read_text().splitlines()]
        assert (s1["done"], s1["failed"], s1["failures_outstanding"], len(fails)) == (0, 8, 8, 8)
        assert all(f["reason"].startswith("HTTP 500") and f["attempts"] == 1 for f in fails)
        s2 = generate_dataset(cfg, retry_failed=False)  # held back: nothing is asked
        assert (s2["done"], s2["held_back_failed"], s2["failures_outstanding"]) == (0, 8, 8)
        s3 = generate_dataset(cfg)  # the stub now answers: the failed ids complete
    assert (s3["done"], s3["failed"], s3["failures_outstanding"]) == (8, 0, 0)
    assert (tmp_path / "out" / "data.jsonl.failures").read_text() == ""


def test_client_errors_fail_fast_without_retry(tmp_path):
    write_prompts(tmp_path / "prompts.jsonl", 2)
    with StubServer(fail_first=400) as stub:
        s = generate_dataset(base_cfg(tmp_path, stub.base_url, sampling={"max_tokens": 4}))
    assert (s["failed"], s["retries"], s["requests"]) == (2, 0, 2)


def test_bad_key_stops_the_run_and_is_never_echoed(tmp_path):
    write_prompts(tmp_path / "prompts.jsonl", 5)
    with StubServer(reject_with_401=True) as stub:
        with pytest.raises(DistilleryError) as err:
            generate_dataset(base_cfg(tmp_path, stub.base_url))
    assert "HTTP 401" in str(err.value) and SECRET[-12:] not in str(err.value) and "REDACTED" in str(err.value)
    assert stub.requests <= 4  # stopped at once, not 10 prompts x retries
    assert json.loads((tmp_path / "out" / "data.jsonl.summary.json").read_text())["fatal_error"]
    assert_no_secret_anywhere(tmp_path)


def test_resume_skips_present_records_and_cuts_a_torn_line(tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 10)
    with StubServer() as stub:
        cfg = base_cfg(tmp_path, stub.base_url)
        generate_dataset(cfg)
        with (tmp_path / "out" / "data.jsonl").open("a") as fh:
            fh.write('{"id": "half-written rec')  # what kill -9 inside write() leaves
        write_prompts(prompts, 5, start=10)
        s = generate_dataset(cfg, sampling={**cfg["sampling"], "n": 3})  # more prompts, more samples each
    recs = read_out(tmp_path)
    assert (s["skipped"], s["done"], s["torn_bytes_dropped"]) == (20, 25, len('{"id": "half-written rec'))
    assert len(recs) == 45 and len({r["id"] for r in recs}) == 45


def _uninterrupted_reference(tmp: Path, url: str) -> list[dict]:
    ref = tmp / "ref"
    ref.mkdir()
    write_prompts(ref / "prompts.jsonl", 40)
    generate_dataset(base_cfg(ref, url))
    return read_out(ref)


def test_kill_9_mid_run_then_rerun_equals_uninterrupted_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write_prompts(run / "prompts.jsonl", 40)
    with StubServer(delay=0.05) as stub:
        expected = _uninterrupted_reference(tmp_path, stub.base_url)
        cfg_path = run / "cfg.json"
        cfg_path.write_text(json.dumps(base_cfg(run, stub.base_url)))
        code = f"import json; from distillery.api import generate_dataset; generate_dataset(json.load(open({str(cfg_path)!r})))"
        proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        out = run / "out" / "data.jsonl"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 15:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        partial = len(read_out(run))
        assert 15 <= partial < 80, partial
        s = generate_dataset(base_cfg(run, stub.base_url))
    got = read_out(run)
    assert s["skipped"] == partial and s["done"] == 80 - partial
    assert sorted(r["id"] for r in got) == sorted(r["id"] for r in expected)
    strip = lambda rs: sorted((r["id"], json.dumps(r["messages"])) for r in rs)  # noqa: E731
    assert strip(got) == strip(expected)  # same answers too: the stub is deterministic
    assert_no_secret_anywhere(tmp_path)


def test_cli_generate_verb(tmp_path, capsys):
    from distillery.cli import main

    write_prompts(tmp_path / "prompts.jsonl", 3)
    with StubServer() as stub:
        cfg = base_cfg(tmp_path, stub.base_url)
        recipe = tmp_path / "recipe.yaml"
        import yaml

        recipe.write_text(yaml.safe_dump({"api": cfg}))
        rc = main(["generate", str(recipe), "sampling.n=1", "api.concurrency=2", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and json.loads(out)["done"] == 3
    assert main(["generate", str(tmp_path / "nope.yaml")]) == 2


def test_output_is_read_by_distillerys_chat_reader(tmp_path):
    data = pytest.importorskip("distillery.data")
    from distillery.config import DataConfig

    write_prompts(tmp_path / "prompts.jsonl", 4)
    with StubServer() as stub:
        generate_dataset(base_cfg(tmp_path, stub.base_url, system_prompt="Be brief."))
    # The output folder holds the data set and its side files; only the data set is read as chat.
    recs = list(data.read_records([str(tmp_path / "out")], DataConfig(format="auto")))
    assert len(recs) == 8 and all([m["role"] for m in r.messages] == ["system", "user", "assistant"] for r in recs)


def test_many_servers_share_the_work_and_a_dead_one_is_routed_around(tmp_path):
    from distillery.api.local_server import free_port

    write_prompts(tmp_path / "prompts.jsonl", 10)
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there: connection refused
    with StubServer() as a, StubServer() as b:
        s = generate_dataset(base_cfg(tmp_path, [a.base_url, dead, b.base_url]))
        assert a.requests >= 5 and b.requests >= 5
    assert (s["done"], s["failed"]) == (20, 0) and s["retries"] >= 5
    assert len({r["id"] for r in read_out(tmp_path)}) == 20
