"""Teacher cache under kill -9 and with two writer processes: the result equals a one-process, uninterrupted cache.

The writers run in subprocesses (a torch-only tiny teacher keeps their start-up short). Equality is
checked byte for byte: every shard file, every commit record and ``manifest.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distillery.cache import CacheReader

TESTS = Path(__file__).parent
SCRIPT = """
import json, sys, time
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from test_cache_support import BlockDataset, TinyTeacher
from distillery.cache import write_cache
out, rank, world, delay = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
model = TinyTeacher(512).eval()
def teacher(batch):
    time.sleep(delay)
    return model(batch["input_ids"])
print("START", flush=True)
summary = write_cache(teacher, {{"train": BlockDataset(30, 16, 512, seed=11), "val": BlockDataset(7, 16, 512, seed=12)}},
                      out, k=8, loss_temperature=1.0, manifest_info={{"tokenizer_hash": "t", "data_fingerprint": {{"n": 37}}}},
                      shard_blocks=3, batch_size=2, rank=rank, world_size=world, progress=False)
print(json.dumps(summary), flush=True)
"""


def _start(script: Path, out: Path, rank: int = 0, world: int = 1, delay: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    return subprocess.Popen([sys.executable, str(script), str(out), str(rank), str(world), str(delay)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _finish(proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    return json.loads(stdout.strip().splitlines()[-1])


def _digest(root: Path) -> dict[str, str]:
    """sha256 of every file that makes up the cache (shards, commit records, header, manifest)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scripts") / "write_cache.py"
    path.write_text(SCRIPT.format(tests=str(TESTS)))
    return path


@pytest.fixture(scope="module")
def reference(script, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "cache"
    summary = _finish(_start(script, out))
    assert summary["complete"] and summary["shards_written"] == 13
    return out


def test_kill9_then_rerun_equals_uninterrupted(script, reference, tmp_path):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    out = tmp_path / "cache"
    kills = []
    for attempt in range(2):  # kill -9 twice at random points of the run, then let it finish
        proc = _start(script, out, delay=0.03)
        assert proc.stdout.readline().strip() == "START"  # imports done: the kill lands inside write_cache
        after = rng.randrange(0, 12)  # wait for this many committed shards (of 13), then a random moment more
        deadline = time.monotonic() + 60
        while len(list(out.rglob("*.commit.json"))) < after and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.1))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        kills.append(len(list(out.rglob("*.commit.json"))))
    summary = _finish(_start(script, out))
    assert summary["complete"], f"seed {seed}, commits at the kills {kills}"
    assert summary["tokens_written"] + summary["tokens_skipped"] == 37 * 16
    assert _digest(out) == _digest(reference), f"resumed cache differs from the uninterrupted one (seed {seed}, commits at the kills {kills})"
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    CacheReader(out, verify="full")


def test_two_processes_write_one_cache(script, reference, tmp_path):
    out = tmp_path / "cache"
    procs = [_start(script, out, rank=r, world=2, delay=0.01) for r in (0, 1)]
    summaries = [_finish(p) for p in procs]
    assert sorted(s["shards_written"] for s in summaries) == [6, 7]  # shards n % 2 == rank, of 13
    assert any(s["complete"] for s in summaries)  # whoever finished last merged the full manifest
    assert _digest(out) == _digest(reference)
    a, b = CacheReader(out), CacheReader(reference)
    idx = torch.tensor([29, 0, 14, 3])
    ta, tb = a.targets(idx), b.targets(idx)
    assert torch.equal(ta.topk_ids, tb.topk_ids) and torch.equal(ta.topk_logprobs, tb.topk_logprobs)
    assert json.loads((out / "manifest.json").read_text())["complete"]
