"""Atomic, resumable training checkpoints.

A checkpoint is a folder ``<run>/checkpoints/step-00000100/`` holding

* ``model.safetensors`` — the student's weights (``safetensors.torch.save_model``: shared/tied
  tensors stored once),
* ``optimizer.pt``, ``scheduler.pt`` — their ``state_dict``s (plain tensors and numbers, read back with
  ``torch.load(weights_only=True)``: no pickle of arbitrary objects),
* ``rng.pt`` — torch CPU (and CUDA) RNG states and the sampling generator's state,
* ``state.json`` — step, data position, tokens seen, and the run's identity: the fingerprint of the
  settings that determine its trajectory (:func:`.run_folder.run_identity`), checked on resume by
  :func:`.run_folder.check_resume`,
* ``COMPLETE`` — written last.

It is written under a temporary name and renamed into place, so a crash at any point leaves either
the previous checkpoint or the new one, never a half-written folder that looks finished; temporary
folders left by a crash are removed by the next save. A full disk ends the save with a one-line
:class:`DistilleryError` (safetensors and ``torch.save`` report it in their own words) after removing
the partial folder; the previous checkpoint stays, so the run resumes once space is freed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from .locks import mkdtemp_plain, umask_modes


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


@contextlib.contextmanager
def atomic_folder(final: Path, what: str, *, keep_existing: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary name next to ``final`` and rename it into place when the block ends
    without error, so a crash never leaves a half-written ``final``. On an error the temporary is removed and
    a full disk becomes a one-line error naming ``what``. ``keep_existing``, for a folder several processes
    may write at once: if ``final`` exists by then (another one finished first), keep it and drop ours, and
    sweep no temporaries (they may be another process's work in progress). Otherwise temporaries a killed
    run left are swept first and an old ``final`` is replaced. (Checkpoints do more: fsync, rotation.)"""
    final.parent.mkdir(parents=True, exist_ok=True)
    if not keep_existing:
        remove_stale(final.parent, final.name + ".tmp-*")
    tmp = mkdtemp_plain(final.name + ".tmp-", final.parent)  # umask decides its mode, as for mkdir
    try:
        yield tmp
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Exception) and is_disk_full(exc, final.parent):
            raise disk_full_error(final.parent, what) from None
        raise
    if final.exists() and keep_existing:
        shutil.rmtree(tmp, ignore_errors=True)
        return
    umask_modes(tmp)  # files some writers made private (safetensors: 0600) get the umask's mode
    if final.exists():
        shutil.rmtree(final)
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (keep_existing and final.exists()):  # lost a race to another process: theirs stands
            raise


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer, scheduler,
                    state: dict, generator: torch.Generator | None = None, keep: int = 2,
                    gathered: tuple[dict, dict] | None = None) -> Path:
    """Write checkpoint ``step`` atomically; keep the newest ``keep`` checkpoints. ``gathered``: the whole
    (model state, name-keyed optimizer state) of a sharded model, written instead of ``model`` / ``optimizer``."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    remove_stale(root, ".step-*")
    tmp = mkdtemp_plain(f".step-{step:08d}.", root)
    try:
        return _write_checkpoint(root, tmp, step, model, optimizer, scheduler, state, generator, keep, gathered)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(exc, root):
            raise disk_full_error(root, f"checkpoint step {step}") from None
        raise


def _write_checkpoint(root: Path, tmp: Path, step: int, model, optimizer, scheduler, state: dict,
                      generator, keep: int, gathered: tuple[dict, dict] | None) -> Path:
    final = root / f"step-{step:08d}"
    if gathered is None:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    else:
        _save_state(gathered[0], tmp / "model.safetensors", model)
        torch.save(gathered[1], tmp / "optimizer.pt")
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
    umask_modes(tmp)
    if final.exists():  # a stale one from a run that crashed after the rename but before cleanup
        _discard(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(root.parent)[:-keep]:
        _discard(old)
    return final


def _save_state(state: dict[str, torch.Tensor], path: Path, model: torch.nn.Module) -> None:
    """A gathered state dict as safetensors; a parameter ``model`` holds under two names (tied embeddings;
    gathering makes two copies of it) is written once, under the name ``save_model`` keeps (the first in
    sorted order), so ``load_model`` restores the tie."""
    from safetensors.torch import save_file

    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    aliases = {n for group in names.values() for n in sorted(group)[1:]}
    save_file({name: t.contiguous() for name, t in state.items() if name not in aliases}, str(path))


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
                    generator: torch.Generator | None = None, load_weights: bool = True) -> dict:
    """Restore everything saved by :func:`save_checkpoint`; return its ``state.json``. ``load_weights=False``:
    the weights were loaded already (FSDP loads them before sharding); ``model`` then only names the
    optimizer's parameters. Optimizer states keyed by index (one process, DDP) or by name (FSDP) load into
    either kind of run."""
    from .errors import DistilleryError

    def tensors(name: str):
        try:  # weights_only: tensors, numbers and containers; any other pickled object is refused, never built
            return torch.load(path / name, weights_only=True)
        except Exception as exc:
            raise DistilleryError(f"checkpoint {path}: {name} is not a plain tensor file written by distillery "
                                  f"({type(exc).__name__}); refusing to unpickle it") from None

    from . import fsdp

    if load_weights:
        load_model(model, str(path / "model.safetensors"))
    opt_state = tensors("optimizer.pt")
    if fsdp.is_named_optimizer_state(opt_state) or fsdp.is_sharded(model):
        fsdp.load_named_optimizer_state(model, optimizer, fsdp.named_optimizer_state(model, optimizer, opt_state))
    else:
        optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict(tensors("scheduler.pt"))
    rng = tensors("rng.pt")
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if generator is not None and "generator" in rng:
        generator.set_state(rng["generator"])
    return json.loads((path / "state.json").read_text())


def checkpoint_problem(path: Path) -> str | None:
    """Why checkpoint ``path`` cannot be resumed from (None if it can), from its files alone: the
    safetensors framing, each ``.pt`` a whole zip archive (torch.save's format; CRCs checked, nothing is
    unpickled) and ``state.json``."""
    import zipfile

    from .preflight import safetensors_problem

    weights = path / "model.safetensors"
    if not weights.is_file():
        return "model.safetensors is missing"
    problem = safetensors_problem(weights)
    if problem:
        return f"model.safetensors {problem}"
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        try:
            with zipfile.ZipFile(path / name) as zf:
                bad = zf.testzip()
        except (OSError, zipfile.BadZipFile, EOFError) as exc:
            return (f"{name} is not a plain tensor file written by distillery ({type(exc).__name__}); "
                    "refusing to unpickle it")
        if bad is not None:
            return f"{name} is damaged (bad checksum in {bad})"
    try:
        state = json.loads((path / "state.json").read_text())
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return "state.json is missing or damaged"
    return None


def usable_checkpoints(run_dir: Path, warn: bool = True) -> list[Path]:
    """:func:`list_checkpoints` up to the newest one that is whole: a damaged newer one (a disk error, a
    copy cut short) is skipped with a warning and the previous complete one is resumed from. Raises a
    one-line error when checkpoints exist but none is whole."""
    import sys

    from .errors import DistilleryError

    ckpts = list_checkpoints(Path(run_dir))
    skipped: list[str] = []
    while ckpts:
        problem = checkpoint_problem(ckpts[-1])
        if problem is None:
            if warn:
                for line in skipped:
                    print(f"warning: {line}; resuming from {ckpts[-1].name}, the previous complete checkpoint",
                          file=sys.stderr)
            return ckpts
        skipped.append(f"checkpoint {ckpts[-1]}: {problem}")
        ckpts = ckpts[:-1]
    if skipped:
        more = f" (and {len(skipped) - 1} older ones are damaged too)" if len(skipped) > 1 else ""
        raise DistilleryError(f"{skipped[0]}{more}: no checkpoint to resume from")
    return []


# ---------------------------------------------------------------------------- divergence

MAX_ABS_WEIGHT = 1e4  # a trained LM's weights stay within a few hundred; 1e4 means the optimizer has blown up


def check_weights(source, step: int, run_dir: Path) -> None:
    """Stop a run whose student weights are non-finite or exploding (``source``: a module or a state dict),
    before they are saved; the error names the last good checkpoint."""
    from .errors import DistilleryError

    tensors = source.state_dict() if isinstance(source, torch.nn.Module) else source
    for name, t in tensors.items():
        if not torch.is_floating_point(t) or t.numel() == 0:
            continue
        peak = float(t.detach().abs().max())
        if not math.isfinite(peak) or peak > MAX_ABS_WEIGHT:
            ckpts = list_checkpoints(Path(run_dir))
            raise DistilleryError(
                f"step {step}: the student diverged ({name} holds {'non-finite values' if not math.isfinite(peak) else f'|w| = {peak:.3g}'}); "
                f"nothing saved; last good checkpoint: {ckpts[-1] if ckpts else 'none'} (lower train.lr or "
                "train.max_grad_norm)")


def check_validation(metrics: dict, step: int, run_dir: Path) -> None:
    """Stop a run whose validation metrics are not finite numbers (a diverged student)."""
    from .errors import DistilleryError

    bad = {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        ckpts = list_checkpoints(Path(run_dir))
        raise DistilleryError(f"step {step}: validation {', '.join(f'{k}={v}' for k, v in bad.items())}: the student "
                              f"diverged; last good checkpoint: {ckpts[-1] if ckpts else 'none'} (lower train.lr)")
