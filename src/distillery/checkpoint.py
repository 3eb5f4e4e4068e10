"""Atomic, resumable training checkpoints.

A checkpoint is a folder ``<run>/checkpoints/step-00000100/`` holding

* ``model.safetensors`` — the student's weights (``safetensors.torch.save_model``: shared/tied
  tensors stored once),
* ``optimizer.pt``, ``scheduler.pt`` — their ``state_dict``s (plain tensors and numbers, read back with
  ``torch.load(weights_only=True)``: no pickle of arbitrary objects),
* ``rng.pt`` — torch CPU (and CUDA) RNG states and the sampling generator's state,
* ``state.json`` — step, data position, tokens seen, and the config fingerprint,
* ``COMPLETE`` — written last.

It is written under a temporary name and renamed into place, so a crash at any point leaves either
the previous checkpoint or the new one, never a half-written folder that looks finished; temporary
folders left by a crash are removed by the next save. A full disk ends the save with a one-line
:class:`DistilleryError` (safetensors and ``torch.save`` report it in their own words) after removing
the partial folder; the previous checkpoint stays, so the run resumes once space is freed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model


def ensure_writable_dir(folder: Path, what: str = "output folder") -> None:
    """Create ``folder`` and prove it is writable, before any compute is spent (one-line error if not)."""
    from .errors import DistilleryError

    if folder.exists() and not folder.is_dir():
        raise DistilleryError(f"{what} '{folder}' is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"  # one per process: ranks probe at once
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise DistilleryError(f"cannot write to {what} '{folder}': {exc.strerror or exc}") from None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether ``exc`` (OSError, safetensors' or torch's own errors) came from a full disk under ``folder``."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    if "No space left" in text or "os error 28" in text or "Disk quota" in text:
        return True
    try:  # torch.save says only "unexpected pos ..." or "file write failed"
        return shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        return False


def disk_full_error(folder: Path, what: str) -> "DistilleryError":
    from .errors import DistilleryError

    return DistilleryError(f"no space left on the device of '{folder}' while writing {what}: free some space, "
                           "then rerun the same command (distill: with --resume; nothing finished was lost)")


def remove_stale(folder: Path, pattern: str) -> None:
    """Delete temporary folders a killed process left behind (only one process writes here)."""
    for old in folder.glob(pattern):
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer, scheduler,
                    state: dict, generator: torch.Generator | None = None, keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically; keep the newest ``keep`` checkpoints."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    remove_stale(root, ".step-*")
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:08d}.", dir=root))
    try:
        return _write_checkpoint(root, tmp, step, model, optimizer, scheduler, state, generator, keep)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(exc, root):
            raise disk_full_error(root, f"checkpoint step {step}") from None
        raise


def _write_checkpoint(root: Path, tmp: Path, step: int, model, optimizer, scheduler, state: dict,
                      generator, keep: int) -> Path:
    final = root / f"step-{step:08d}"
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        rng["generator"] = generator.get_state()
    torch.save(rng, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    (tmp / "COMPLETE").write_text("ok\n")
    if final.exists():  # a stale one from a run that crashed after the rename but before cleanup
        _discard(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(root.parent)[:-keep]:
        _discard(old)
    return final


def _discard(folder: Path) -> None:
    """Delete a checkpoint so that a kill mid-way never leaves a 'step-*' folder with COMPLETE but
    missing files: rename it out of the 'step-*' namespace first (atomic), then delete it; a leftover
    is swept by ``remove_stale(root, ".step-*")`` on the next save."""
    doomed = folder.with_name(f".{folder.name}.discard-{os.getpid()}")
    os.rename(folder, doomed)
    _fsync_dir(folder.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (temporary and incomplete folders are ignored)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / "COMPLETE").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler,
                    generator: torch.Generator | None = None) -> dict:
    """Restore everything saved by :func:`save_checkpoint`; return its ``state.json``."""
    from .errors import DistilleryError

    def tensors(name: str):
        try:  # weights_only: tensors, numbers and containers; any other pickled object is refused, never built
            return torch.load(path / name, weights_only=True)
        except Exception as exc:
            raise DistilleryError(f"checkpoint {path}: {name} is not a plain tensor file written by distillery "
                                  f"({type(exc).__name__}); refusing to unpickle it") from None

    load_model(model, str(path / "model.safetensors"))
    optimizer.load_state_dict(tensors("optimizer.pt"))
    scheduler.load_state_dict(tensors("scheduler.pt"))
    rng = tensors("rng.pt")
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if generator is not None and "generator" in rng:
        generator.set_state(rng["generator"])
    return json.loads((path / "state.json").read_text())
