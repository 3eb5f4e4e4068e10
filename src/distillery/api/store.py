"""Durable, exactly-once JSONL output: append one fsync'd line per record, resume by id.

Why this is exactly-once under ``kill -9``:

* a record is written with one ``os.write`` of the whole line on an ``O_APPEND`` descriptor, then
  ``fsync``'d, and only then counted as done; a record that was not fully written is not in the file
  as a complete line, so a rerun asks for it again (no loss);
* on open, the ids of all complete lines are read and skipped (no duplicates); a torn last line (the
  process died inside ``write``) has no final newline and is cut off before anything is appended;
* one process at a time: an exclusive ``flock`` on ``<output>.lock`` (released by the kernel when a
  process dies, so a killed run never blocks the rerun); two concurrent runs would otherwise both
  produce the missing records.

Failures go to a side file (JSON lines ``{"id", "reason", "attempts", "source", "time"}``) written the
same way. A corrupt line in the middle of either file (not the torn tail) raises
:class:`DistilleryError` naming the file and line.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from ..errors import DistilleryError


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RECORD_START = b'{"id"'  # how every line the store writes begins (records and failures put "id" first)


def scan_jsonl(path: Path, repair: bool) -> tuple[list[dict], int]:
    """Read the complete lines of ``path``; return ``(objects, torn_bytes)``.

    A last line without its newline is torn: it is ignored and, with ``repair``, truncated away.
    """
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # 0 if no complete line
    torn = len(data) - end
    objs = []
    for lineno, line in enumerate(data[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DistilleryError(f"{path}:{lineno}: corrupt line ({exc.msg}); remove or fix it and rerun") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
            raise DistilleryError(f"{path}:{lineno}: record has no string 'id' (not written by `distillery generate`?)")
        objs.append(obj)
    # Only a record of ours is cut: every line is written whole as '{"id":...}\n', so a torn one starts so. The
    # complete lines were checked first; before, a file of the user's lost its last line (or all of it) first.
    tail = data[end:]
    if torn and not (tail.startswith(_RECORD_START) or _RECORD_START.startswith(tail)):
        raise DistilleryError(f"{path}: its last line ({tail[:40]!r}) is not a record of `distillery generate` "
                              "and has no newline: not this verb's file? give another output file")
    if torn and repair:
        with open(path, "r+b") as fh:
            fh.truncate(end)
            fh.flush()
            os.fsync(fh.fileno())
    return objs, torn


class JsonlAppender:
    """Append-only JSON lines file; each :meth:`append` is one write (+ fsync) of one whole line."""

    def __init__(self, path: Path, fsync: bool = True) -> None:
        self.path = path
        self.fsync = fsync
        path.parent.mkdir(parents=True, exist_ok=True)
        created = not path.exists()
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        if created and fsync:
            _fsync_dir(path.parent)  # the file's directory entry survives a crash too

    def append(self, obj: dict) -> None:
        line = (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        view = memoryview(line)
        while view:  # os.write on a regular file writes everything; loop only for exotic file systems
            n = os.write(self._fd, view)
            view = view[n:]
        if self.fsync:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class DatasetStore:
    """The output data set plus its failures file, locked for one run."""

    def __init__(self, output: str | Path, failures: str | Path, fsync: bool = True) -> None:
        self.output, self.failures_path = Path(output), Path(failures)
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(f"{self.output}.lock", os.O_WRONLY | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise DistilleryError(f"{self.output}: another `distillery generate` is writing it (lock {self.output}.lock)") from None
        records, self.torn_bytes = scan_jsonl(self.output, repair=True)
        self.done_ids = {r["id"] for r in records}
        self.duplicates_on_disk = len(records) - len(self.done_ids)
        old_failures, torn_f = scan_jsonl(self.failures_path, repair=True)
        self.torn_bytes += torn_f
        # Latest failure per id that is still missing from the output.
        self.previous_failures = {f["id"]: f for f in old_failures if f["id"] not in self.done_ids}
        self._fsync = fsync
        self._out = JsonlAppender(self.output, fsync)
        self._fail: JsonlAppender | None = None

    def _rewrite_failures(self, entries: list[dict]) -> None:
        tmp = self.failures_path.with_name(self.failures_path.name + ".tmp")
        with open(tmp, "wb") as fh:
            for f in entries:
                fh.write((json.dumps(f, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.failures_path)
        _fsync_dir(self.failures_path.parent)

    def start_failures(self) -> None:
        """Compact the failures file to the ids still missing (atomically); new failures append to it."""
        self._rewrite_failures(list(self.previous_failures.values()))
        self._fail = JsonlAppender(self.failures_path, self._fsync)

    def finish_failures(self) -> dict[str, dict]:
        """Compact the failures file to the latest failure of each id still missing; return them by id."""
        if self._fail is not None:
            self._fail.close()
            self._fail = None
        entries, _ = scan_jsonl(self.failures_path, repair=True)
        latest = {f["id"]: f for f in entries if f["id"] not in self.done_ids}
        self._rewrite_failures(list(latest.values()))
        return latest

    def write_record(self, record: dict) -> None:
        self._out.append(record)
        self.done_ids.add(record["id"])

    def write_failure(self, rid: str, reason: str, attempts: int, source: str) -> None:
        assert self._fail is not None, "call start_failures() first"
        self._fail.append({"id": rid, "reason": reason, "attempts": attempts, "source": source,
                           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    def close(self) -> None:
        self._out.close()
        if self._fail is not None:
            self._fail.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def __enter__(self) -> "DatasetStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
