"""Outputs are created with the modes the user's umask gives (no private 0700/0600 forced by temp folders)."""

from __future__ import annotations

import os
import stat

import pytest

from distillery.checkpoint import atomic_folder
from distillery.config import load_config
from distillery.locks import current_umask
from distillery.train import distill
from helpers_run import write_recipe


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


def _modes(root):
    for dirpath, dirnames, filenames in os.walk(root):
        yield dirpath, stat.S_IMODE(os.stat(dirpath).st_mode)
        for f in filenames:
            p = os.path.join(dirpath, f)
            yield p, stat.S_IMODE(os.stat(p).st_mode)


def test_run_folder_follows_umask(tmp_path, umask):
    umask(0o022)
    assert current_umask() == 0o022
    run = tmp_path / "run"
    distill(load_config(write_recipe(tmp_path, run, train={"max_steps": 2, "save_every": 2, "eval_every": 0})))
    modes = dict(_modes(run))
    assert run / "student" / "model.safetensors" in map(type(run), modes)
    bad = {p: oct(m) for p, m in modes.items() if m != (0o755 if os.path.isdir(p) else 0o644)}
    assert not bad, bad


def test_atomic_folder_mode_is_the_umasks(tmp_path, umask):
    for mask, want in ((0o002, 0o775), (0o077, 0o700)):
        umask(mask)
        with atomic_folder(tmp_path / f"out{mask:o}", "test") as tmp:
            (tmp / "f").write_text("x")
        assert stat.S_IMODE((tmp_path / f"out{mask:o}").stat().st_mode) == want
