"""A full disk: each long stage stops with one clean ``error:`` line (exit 2), leaves nothing partial that
looks finished, and — once space is freed — the same command finishes with the result of a run that
never ran out of space (bitwise for distill and the cache).

The disk is a size-limited tmpfs mounted for the test (``mount -t tmpfs -o size=...``, then
``remount,size=...`` to "free space"); without the right to mount (not root, no CAP_SYS_ADMIN) the
tests skip.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from distillery.cli import main
from helpers_run import write_recipe

DATA = {"max_train_blocks": 40, "max_val_blocks": 8}
TRAIN = {"max_steps": 6, "save_every": 1, "eval_every": 0, "eval_batches": 1}


@pytest.fixture
def small_disk(tmp_path):
    """``(mountpoint, resize)``: a 1 MiB tmpfs; ``resize('16m')`` frees space."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")

    def resize(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)

    yield mnt, resize
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _one_error_line(err: str, server_noise: bool = False) -> str:
    """The one ``error:`` line; nothing else but progress bars (and, with ``server_noise``, the in-process stub
    server's own tracebacks about connections the client dropped)."""
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "space" in errors[0].lower(), err
    if not server_noise:
        rest = [ln for ln in err.splitlines() if ln.strip() and ln not in errors and "it/s]" not in ln]
        assert not rest, err
    return errors[0]


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_distill_fails_cleanly_then_resumes_after_space_is_freed(tmp_path, small_disk, capsys):
    mnt, resize = small_disk
    ref, run = tmp_path / "ref", mnt / "run"
    assert main(["distill", str(write_recipe(tmp_path, ref, data=DATA, train=TRAIN))]) == 0
    recipe = write_recipe(tmp_path, run, data=DATA, train=TRAIN)
    capsys.readouterr()
    assert main(["distill", str(recipe)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--resume" in line
    assert not (run / "student").exists() and not list(run.rglob(".step-*"))  # the partial checkpoint is gone
    for ck in (run / "checkpoints").glob("step-*"):
        assert (ck / "COMPLETE").is_file()
    resize("16m")
    assert main(["distill", str(recipe), "--resume"]) == 0
    a, b = (ref / "student" / "model.safetensors").read_bytes(), (run / "student" / "model.safetensors").read_bytes()
    assert a == b
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k not in ("tok_s", "step_s")} for x in p.read_text().splitlines()]  # noqa: E731
    assert strip(run / "metrics.jsonl") == strip(ref / "metrics.jsonl")


def test_cache_fails_cleanly_then_finishes_after_space_is_freed(tmp_path, small_disk, capsys):
    from distillery.cache import CacheReader
    from distillery.errors import DistilleryError

    mnt, resize = small_disk
    recipe = write_recipe(tmp_path, tmp_path / "unused", data=DATA)
    args = ["--k", "512", "--logprob-encoding", "float16", "--batch-size", "2", "--shard-blocks", "2", "--no-progress"]
    assert main(["cache", str(recipe), "--out", str(tmp_path / "ref-cache"), *args]) == 0
    capsys.readouterr()
    out = mnt / "cache"
    assert main(["cache", str(recipe), "--out", str(out), *args]) == 2
    _one_error_line(capsys.readouterr().err)
    with pytest.raises(DistilleryError, match="incomplete"):
        CacheReader(out)
    resize("16m")
    assert main(["cache", str(recipe), "--out", str(out), *args]) == 0
    assert _digest(out) == _digest(tmp_path / "ref-cache")
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_generate_fails_cleanly_then_finishes_after_space_is_freed(tmp_path, small_disk, capsys, monkeypatch):
    import yaml

    from openai_stub import StubServer
    from test_api_generate import KEY_ENV, SECRET, base_cfg, write_prompts

    mnt, resize = small_disk
    monkeypatch.setenv(KEY_ENV, SECRET)
    write_prompts(tmp_path / "prompts.jsonl", 30)
    subprocess.run(["dd", "if=/dev/zero", f"of={mnt / 'ballast'}", "bs=1k", "count=1000"], capture_output=True)
    with StubServer() as stub:
        cfg = base_cfg(tmp_path, stub.base_url, output=str(mnt / "out" / "data.jsonl"))
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(yaml.safe_dump({"api": cfg}))
        rc = main(["generate", str(recipe), "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2, err
        _one_error_line(err, server_noise=True)
        (mnt / "ballast").unlink()
        resize("16m")
        assert main(["generate", str(recipe), "--quiet"]) == 0
    recs = [json.loads(x) for x in (mnt / "out" / "data.jsonl").read_text().splitlines()]
    assert len(recs) == 60 and len({r["id"] for r in recs}) == 60
