"""Files of a teacher cache folder, atomic commits and the manifest merge.

::

    DIR/header.json                   what the cache is (teacher, tokenizer, data, k, temperature, encoding, splits)
    DIR/manifest.json                 header + every committed shard (sha256, bytes, rows, indices) + "complete"
    DIR/<split>/<nnnnn>.arrow         shard nnnnn of a split: blocks [n*S, (n+1)*S) of that split
    DIR/<split>/<nnnnn>.commit.json   the shard's commit record (written after the shard is in place)
    DIR/tokenizer/                    the teacher's tokenizer (optional)
    DIR/.lock                         serialises manifest merges between writer processes

Every file is written to a temporary name in the same folder, fsynced, renamed into place, and the
folder is fsynced: a reader never sees half a file. A shard counts as committed only once its
commit record exists and matches it, so a kill at any point leaves either a committed shard or
nothing that counts. ``manifest.json`` is a pure function of ``header.json`` and the commit records;
each writer rewrites it under an exclusive lock when it finishes, so the last writer to finish
always records every shard (race-free with any number of processes).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from pathlib import Path

from ..errors import DistilleryError
from ..hashing import file_sha256

FORMAT = "distillery-teacher-cache"
FORMAT_VERSION = 1  # top-k + tail bucket (six shard columns)
FORMAT_VERSION_SAMPLED = 2  # + a sampled tail (two more shard columns; the manifest's "tail" says m)
READABLE_VERSIONS = (FORMAT_VERSION, FORMAT_VERSION_SAMPLED)
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_-]+$")

try:  # POSIX; elsewhere merges are unlocked (one writer process at a time)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None


# ---------------------------------------------------------------------------- paths
def shard_path(root: Path, split: str, shard: int) -> Path:
    return root / split / f"{shard:05d}.arrow"


def commit_path(root: Path, split: str, shard: int) -> Path:
    return root / split / f"{shard:05d}.commit.json"


def check_split_name(split: str) -> None:
    if not _SPLIT_RE.match(split):
        raise DistilleryError(f"cache split name '{split}' may only hold letters, digits, '_' and '-'")


def member(root: Path, rel) -> Path:
    """``root / rel`` for a file a manifest names, refused unless it stays inside the cache folder: a
    manifest is data, and ``../../x`` or an absolute path in it must never make the reader open other files."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise DistilleryError(f"teacher cache {root}: its manifest names the file {rel!r}, outside the cache folder; "
                              "refusing to read it (the manifest is damaged or was not written by distillery)")
    path = root / rel
    real_root = root.resolve()
    if real_root not in path.resolve().parents:  # a symlink pointing elsewhere
        raise DistilleryError(f"teacher cache {root}: '{rel}' leads outside the cache folder; refusing to read it")
    return path


MANIFEST_KEYS = ("k", "seq_len", "vocab_size", "loss_temperature", "encoding", "splits", "shards")
SHARD_KEYS = ("split", "shard", "file", "bytes", "rows", "first_index", "last_index", "sha256")


def check_manifest(m: dict, path: Path) -> None:
    """One-line error naming the first key a readable manifest must hold and does not (or holds in another shape)."""
    missing = [k for k in MANIFEST_KEYS if k not in m]
    if missing:
        raise DistilleryError(f"{path}: the manifest has no '{missing[0]}'; the cache is damaged: rewrite it with "
                              "`distillery cache`")
    if not isinstance(m["splits"], dict) or not isinstance(m["shards"], list) or not all(
            isinstance(v, dict) and isinstance(v.get("blocks"), int) for v in m["splits"].values()):
        raise DistilleryError(f"{path}: the manifest's 'splits' or 'shards' has another shape; the cache is damaged: "
                              "rewrite it with `distillery cache`")
    for i, rec in enumerate(m["shards"]):
        gone = [k for k in SHARD_KEYS if not isinstance(rec, dict) or k not in rec]
        if gone:
            raise DistilleryError(f"{path}: shard record {i} has no '{gone[0]}'; the cache is damaged: rewrite it with "
                                  "`distillery cache`")


# ---------------------------------------------------------------------------- atomic files
def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover  (platforms without directory fds)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either its old content or all of ``data``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask decides
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_json(path: Path, obj: dict) -> None:
    atomic_write(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DistilleryError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); the cache file is corrupt") from None
    if not isinstance(obj, dict):
        raise DistilleryError(f"{path}: expected a JSON object")
    return obj


def remove_stale_temps(folder: Path, prefixes: set[str]) -> None:
    """Delete temporary files left by a killed writer for the given final file names."""
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if ".tmp-" in p.name and p.name.split(".tmp-")[0] in prefixes:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


@contextlib.contextmanager
def locked(root: Path):
    """Exclusive lock on ``root/.lock`` (released by the OS if the process dies)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a+b") as fh:
        if fcntl is not None:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# ---------------------------------------------------------------------------- commits and manifest
def valid_commit(root: Path, split: str, shard: int, verify_sha: bool = False) -> dict | None:
    """The shard's commit record if the shard is committed (record present, size matches), else None."""
    cp, sp = commit_path(root, split, shard), shard_path(root, split, shard)
    if not cp.is_file() or not sp.is_file():
        return None
    try:
        rec = json.loads(cp.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if rec.get("bytes") != sp.stat().st_size:
        return None
    if verify_sha and file_sha256(sp) != rec.get("sha256"):
        return None
    return rec


def merge_manifest(root: Path) -> dict:
    """Rebuild ``manifest.json`` from the header and the commit records, under the lock; return it."""
    with locked(root):
        header = read_json(root / "header.json")
        shards, done = [], 0
        for split, info in header["splits"].items():
            for n in range(info["shards"]):
                rec = valid_commit(root, split, n)
                if rec is not None:
                    shards.append(rec)
                    done += 1
        expected = sum(info["shards"] for info in header["splits"].values())
        manifest = dict(header)
        manifest["shards"] = shards
        manifest["committed_shards"] = done
        manifest["expected_shards"] = expected
        manifest["complete"] = done == expected
        write_json(root / "manifest.json", manifest)
        return manifest


def first_difference(have, want, path: str = "") -> tuple[str, object, object] | None:
    """The first place where two JSON-like values differ: ``(path, have, want)``, or None if equal."""
    if isinstance(have, dict) and isinstance(want, dict):
        for key in sorted(set(have) | set(want), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in have or key not in want:
                return sub, have.get(key, "<absent>"), want.get(key, "<absent>")
            diff = first_difference(have[key], want[key], sub)
            if diff:
                return diff
        return None
    if isinstance(have, (list, tuple)) and isinstance(want, (list, tuple)):
        if len(have) != len(want):
            return f"{path} (length)" if path else "(length)", len(have), len(want)
        for i, (a, b) in enumerate(zip(have, want)):
            diff = first_difference(a, b, f"{path}[{i}]")
            if diff:
                return diff
        return None
    if isinstance(have, (int, float)) and isinstance(want, (int, float)) and not isinstance(have, bool):
        same = have == want or abs(float(have) - float(want)) <= 1e-9 * max(abs(float(have)), abs(float(want)))
        return None if same else (path, have, want)
    return None if have == want else (path, have, want)
