"""Output folders for the folder-shaped exports (MLX, ExecuTorch, Core ML): checked, staged, then moved in place.

Rules: the output never lies inside (or equals, or contains) the student folder, so an export can
never write over its own input; an existing output folder is replaced only when it holds a previous
export of the same format (its manifest file is there), never an unrelated folder. The export is
written into a hidden sibling folder first and renamed at the end, so a crash leaves no half-written
output under the real name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from ..errors import DistilleryError
from ..locks import mkdtemp_plain, umask_modes


def check_out_dir(student: Path, out: Path, manifest: str, fmt: str) -> Path:
    """Return ``out`` resolved after refusing outputs that overlap the student or clobber a foreign folder."""
    src, dst = student.resolve(), out.expanduser().resolve()
    if dst == src or src in dst.parents:
        raise DistilleryError(f"{fmt} output '{out}' is inside the student folder '{student}'; choose a folder outside it")
    if dst in src.parents:
        raise DistilleryError(f"{fmt} output '{out}' contains the student folder '{student}'; choose another folder")
    if dst.exists() and not dst.is_dir():
        raise DistilleryError(f"{fmt} output '{out}' is a file; give a folder")
    if dst.is_dir() and any(dst.iterdir()) and not (dst / manifest).is_file():
        raise DistilleryError(f"{fmt} output folder '{out}' exists and is not a previous {fmt} export; "
                              "give a new or empty folder")
    return dst


@contextlib.contextmanager
def staged_folder(out: Path):
    """Yield an empty hidden folder beside ``out``; on success it replaces ``out``, on error it is deleted."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = mkdtemp_plain(f".{out.name}.partial-", out.parent)
    try:
        yield tmp
        umask_modes(tmp)  # the umask's modes, whatever the runtime's writer chose
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def folder_bytes(folder: Path, pattern: str = "*") -> int:
    """Total size in bytes of the files under ``folder`` matching ``pattern`` (recursive)."""
    return sum(f.stat().st_size for f in Path(folder).rglob(pattern) if f.is_file())


def reject(path: Path) -> Path:
    """Move a failed export aside (``<name>.rejected``) so it is never mistaken for a good one."""
    target = path.with_name(path.name + ".rejected")
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    os.replace(path, target)
    return target
