"""`distillery cache` (the CLI, a real tiny teacher folder) under kill -9 at seeded random points, then rerun:
the cache equals an uninterrupted one file for file (sha256 of every shard, commit record, header,
manifest, tokenizer file), and after every kill the reader refuses the unfinished cache as
incomplete (it never serves a partial one). Default suite: 2 kills; slow tier: 6.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from crash_harness import cli, draw_points, kill_and_resume, run_to_end
from distillery.cache import CacheReader
from distillery.errors import DistilleryError
from helpers_run import write_recipe

DATA = {"max_train_blocks": 40, "max_val_blocks": 8}
SHARDS = 40 // 2 + 8 // 2


def _argv(recipe: Path, out: Path) -> list[str]:
    return cli("cache", str(recipe), "--out", str(out), "--k", "8", "--batch-size", "2", "--shard-blocks", "2",
               "--no-progress")


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def _progress(out: Path):
    def committed() -> int:
        while True:
            try:
                return len(list(out.rglob("*.commit.json"))) if out.exists() else 0
            except FileNotFoundError:  # the run renamed a temp folder (its tokenizer's atomic write) under the walk
                continue
    return committed


def _invariants(out: Path):
    def check() -> None:
        try:
            reader = CacheReader(out)
        except DistilleryError as exc:  # unfinished: refused with a message saying how to finish it
            assert "incomplete" in str(exc) or "no manifest" in str(exc) or "not a teacher cache" in str(exc), exc
            return
        assert reader.manifest["complete"]  # a kill after the last commit: the cache must then be whole
        CacheReader(out, verify="full")
    return check


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("crash-cache")
    recipe = write_recipe(root, root / "unused", data=DATA)
    ref = root / "ref-cache"
    run_to_end(_argv(recipe, ref))
    assert len(list(ref.rglob("*.commit.json"))) == SHARDS
    return root, recipe, ref


@pytest.mark.parametrize("seed, kills", [
    pytest.param(31337, 2, id="2-kills"),
    pytest.param(4242, 6, id="6-kills", marks=pytest.mark.slow),
])
def test_kill9_then_rerun_equals_uninterrupted(reference, seed, kills):
    root, recipe, ref = reference
    out = root / f"cache-{seed}"
    points = draw_points(seed, kills, first=0, last=SHARDS - 4, max_delay=0.02)
    log = kill_and_resume(_argv(recipe, out), _progress(out), points, seed, check=_invariants(out))
    assert len(log.progress_at_kill) == kills, log
    assert _digest(out) == _digest(ref), f"resumed cache differs from the uninterrupted one ({log})"
    assert not [p for p in out.rglob("*") if ".tmp" in p.name], log
    reader = CacheReader(out, verify="full")
    assert reader.manifest["complete"] and sum(reader.splits.values()) == 48
    print(log)
