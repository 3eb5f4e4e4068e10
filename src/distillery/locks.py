"""One writer per output folder, and no verb writing over its own input.

* :func:`output_lock` holds ``fcntl.flock`` on ``<folder>/.lock`` while a run writes the folder; a second
  run into the same folder stops at once with one line naming the process that holds it (two runs into one
  folder would interleave ``metrics.jsonl`` and rotate away each other's checkpoints). The OS drops the lock
  when the holder exits, however it exits, so a killed run never leaves a stale lock behind.
* :func:`locked_run` wraps ``train.distill`` in that lock (main process only: under ``accelerate launch``
  the other ranks of the same run write nothing there).
* :func:`refuse_overwrite` stops a verb whose output would replace one of its inputs
  (``export STUDENT STUDENT/model.safetensors``, ``report RUN --out RUN/metrics.jsonl``).
* :func:`refuse_foreign` stops a verb from writing into a folder of other files (``--out ~/notes``): an output
  folder is new, empty, or already that verb's own.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import DistilleryError

try:  # POSIX; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None


@contextlib.contextmanager
def output_lock(folder: str | Path, what: str = "output folder") -> Iterator[None]:
    """Hold an exclusive lock on ``folder/.lock`` for the block; raise a one-line error if another process has it.

    The file keeps the holder's ``pid host start-time`` so the refusal can name it. A folder that cannot be
    created or written is left to the caller's own check (``ensure_writable_dir``), which words it better."""
    folder = Path(folder)
    if fcntl is None or (folder.exists() and not folder.is_dir()):
        yield
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fh = open(folder / ".lock", "a+")
    except OSError:
        yield
        return
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().split()
            who = f"process {holder[0]}" + (f" on {holder[1]}" if len(holder) > 1 else "") if holder else "another process"
            raise DistilleryError(f"{what} '{folder}' is being written by another run ({who} holds {folder / '.lock'}): "
                                  f"wait for it to finish, or choose another {what}") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def locked_run(fn):
    """Decorator for ``distill(cfg, resume=...)``: the main process holds ``train.output_dir``'s lock for the call."""
    @functools.wraps(fn)
    def wrapper(cfg, *args, **kwargs):
        if os.environ.get("RANK", "0") != "0":  # other ranks of one launched run: the main one holds it
            return fn(cfg, *args, **kwargs)
        with output_lock(cfg.train.output_dir, "train.output_dir"):
            return fn(cfg, *args, **kwargs)
    return wrapper


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def refuse_foreign(folder: str | Path, own: tuple[str, ...], what: str, whose: str) -> None:
    """Raise if ``folder`` holds files but none of ``own`` (the names a previous output of this verb leaves): the
    files are somebody else's, and writing among them could replace one. ``whose``: ``"a teacher cache's"``."""
    folder = Path(folder)
    if not folder.is_dir() or any((folder / n).exists() for n in own):
        return
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))  # not .lock, probes, staging
    if names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise DistilleryError(f"{what} '{folder}' holds files that are not {whose} ({shown}): give a new or empty "
                              "folder")


def refuse_overwrite(out: str | Path, inputs: dict[str, str | Path], verb: str) -> None:
    """Raise if writing ``out`` would replace an input: ``out`` is an input file, an existing file inside an
    input folder, an input folder itself, or a folder holding an input (a folder output replaces what was there).

    ``inputs`` maps what each input is called in messages (``'the student folder'``) to its path."""
    o = Path(out).expanduser().resolve()
    for name, path in inputs.items():
        p = Path(path).expanduser().resolve()
        if not p.exists():
            continue
        clash = (o == p or (p.is_dir() and _inside(o, p) and o.exists()) or (o.exists() and o.is_dir() and _inside(p, o)))
        if clash:
            raise DistilleryError(f"{verb}: the output '{out}' would write over {name} '{path}' (its own input): "
                                  "choose an output outside it")


def current_umask() -> int:
    """The process umask (read from /proc where it is, else set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def mkdtemp_plain(prefix: str, parent: str | Path) -> Path:
    """``tempfile.mkdtemp`` with the mode a plain ``mkdir`` would get (0o777 minus the umask): a temporary
    folder renamed into place as an output would otherwise keep mkdtemp's private 0700."""
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


def umask_modes(folder: str | Path) -> None:
    """Give every file and folder under ``folder`` the mode the umask gives a new one (0o666 / 0o777 minus it).
    Some writers create files private whatever the umask (safetensors writes 0600): called on an output folder
    built under a temporary name, before it is renamed into place."""
    mask = current_umask()
    for dirpath, _, filenames in os.walk(folder):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)
