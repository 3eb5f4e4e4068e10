"""No third-party noise in the verbs' output: torchao/torch-pytree import lines and transformers' loading bars."""

from __future__ import annotations

import os
import subprocess
import sys

from tiny import tiny_llama, tiny_tokenizer

NOISE = ("Failed to load", "Enum subclass", "torchvision", "Loading weights", "Writing model shards")


def _run(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300, **kw)


def test_importing_the_loop_prints_nothing():
    proc = _run(["-c", "import distillery.train, distillery.export.api, transformers.quantizers.auto"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "" and proc.stdout.strip() == ""


def test_a_verb_shows_no_loading_bars(tmp_path):
    folder = tmp_path / "student"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer(512).save_pretrained(folder)
    proc = _run(["-m", "distillery.cli", "export", str(folder), str(tmp_path / "s.gguf"), "--format", "gguf",
                 "--no-verify"])
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "s.gguf").is_file()
    shown = [n for n in NOISE if n in proc.stderr or n in proc.stdout]
    assert not shown, proc.stderr[-2000:]
