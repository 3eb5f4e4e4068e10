"""`distillery generate` (the CLI, against the stdlib stub server) under kill -9 at seeded random points, then
rerun: every planned record is in the output exactly once with the uninterrupted run's content, and
after every kill the output holds only whole records (at most one torn last line, which the rerun
cuts). Default suite: 2 kills; slow tier: 6.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from crash_harness import child_env, cli, draw_points, kill_and_resume
from distillery.api import generate_dataset
from openai_stub import StubServer
from test_api_generate import KEY_ENV, SECRET, assert_no_secret_anywhere, base_cfg, write_prompts

PROMPTS, SAMPLES = 40, 2


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    whole = [json.loads(x) for x in lines[:-1]]
    try:
        whole.append(json.loads(lines[-1]))
    except (IndexError, ValueError):
        pass  # a torn last line: the rerun drops it
    return whole


def _invariants(out: Path):
    def check() -> None:
        recs = _records(out)
        ids = [r["id"] for r in recs]
        assert len(ids) == len(set(ids)), "a record was written twice"
    return check


def _progress(out: Path):
    return lambda: out.read_bytes().count(b"\n") if out.exists() else 0


@pytest.mark.parametrize("seed, kills", [
    pytest.param(77, 2, id="2-kills"),
    pytest.param(5150, 6, id="6-kills", marks=pytest.mark.slow),
])
def test_kill9_then_rerun_equals_uninterrupted(tmp_path, monkeypatch, seed, kills):
    monkeypatch.setenv(KEY_ENV, SECRET)
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    for d in (ref_dir, run_dir):
        d.mkdir()
        write_prompts(d / "prompts.jsonl", PROMPTS)
    with StubServer(delay=0.03) as stub:
        generate_dataset(base_cfg(ref_dir, stub.base_url))
        recipe = run_dir / "recipe.yaml"
        recipe.write_text(yaml.safe_dump({"api": base_cfg(run_dir, stub.base_url)}))
        out = run_dir / "out" / "data.jsonl"
        points = draw_points(seed, kills, first=0, last=PROMPTS * SAMPLES - 12, max_delay=0.05)
        log = kill_and_resume(cli("generate", str(recipe), "--quiet"), _progress(out), points, seed,
                              check=_invariants(out), env=child_env(**{KEY_ENV: SECRET}))
    assert len(log.progress_at_kill) == kills, log
    got, want = _records(out), _records(ref_dir / "out" / "data.jsonl")
    assert len(got) == PROMPTS * SAMPLES and len({r["id"] for r in got}) == len(got), log
    strip = lambda rs: sorted((r["id"], json.dumps(r["messages"])) for r in rs)  # noqa: E731
    assert strip(got) == strip(want), f"resumed output differs from the uninterrupted one ({log})"
    assert out.read_text().endswith("\n")
    assert_no_secret_anywhere(tmp_path)
    print(log)
