"""What a run may write into and resume from: ``train.output_dir`` is new, empty, or (with ``--resume``) a run's
own, and a resume keeps the settings that shape the run's trajectory (:func:`check_resume`).

Before this check a fresh run into the folder of a run cut short before its first checkpoint appended its records
to that run's ``metrics.jsonl`` (a report then drew two runs as one curve); a folder of the user's own files got a
run written among them. (A finished run always holds its final checkpoint, which was refused already.)
"""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import list_checkpoints
from .errors import DistilleryError
from .locks import refuse_foreign

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "student", "checkpoints")  # what a run leaves
# also a run's own, but no run's record: the trained student tokenizer (student.tokenizer bpe:N, written when the
# run is set up and reused by it) and the file trackers' logs
RUN_AIDS = ("student_tokenizer", "logs")


def check_run_dir(out: Path, resume: bool) -> None:
    """No run writes over another: a fresh run needs a new or empty ``train.output_dir`` (an earlier run's
    ``metrics.jsonl`` would get its records appended, its student replaced); ``--resume`` needs one holding a run
    or nothing. A folder of other files is refused either way."""
    refuse_foreign(out, RUN_FILES + RUN_AIDS, "train.output_dir", "a run's")
    held = [n for n in RUN_FILES if (out / n).exists()]
    if resume or not held:
        return
    if list_checkpoints(out):
        raise DistilleryError(f"{out} already holds checkpoints: pass --resume to continue, or choose another train.output_dir")
    raise DistilleryError(f"{out} already holds a run ({', '.join(held)}) and no checkpoint to resume: choose another "
                          "train.output_dir, or pass --resume to run it again from step 0 in its place")


# ---------------------------------------------------------------------------- run identity and resume

# Settings a resume may change: how long the run goes, how often it reports and where, where things run or how
# memory is held, not the path the weights take. micro_batch_size may change with the number of processes as
# long as the blocks per step stay the same (train.py checks that product against the checkpoint's).
RESUMABLE_CHANGES = frozenset({
    "train.max_steps", "train.eval_every", "train.eval_batches", "train.save_every", "train.keep_checkpoints",
    "train.log_every", "train.progress", "train.output_dir", "train.tensorboard", "train.report_to",
    "train.micro_batch_size", "train.return_large_frees", "teacher.device", "teacher.base_urls",
    "teacher.api_key_env", "teacher.timeout_s", "teacher.max_retries", "teacher.concurrency", "teacher.prefetch",
    "loss.chunk_size", "generation.collapse_guard"})


def run_identity(cfg) -> dict:
    """The settings that determine a run's training trajectory, flattened (``{'loss.kd': 'jsd', ...}``):
    every setting of the config except :data:`RESUMABLE_CHANGES` (sections added later are included)."""
    flat: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and not (prefix == "student.model"):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif prefix not in RESUMABLE_CHANGES and prefix.split(".")[0] not in ("cache", "eval"):  # other verbs' settings
            flat[prefix] = value

    walk("", cfg.model_dump(mode="json"))
    return flat


def run_fingerprint(cfg) -> str:
    """sha256 of :func:`run_identity` as canonical JSON: equal fingerprints, equal trajectories."""
    import hashlib

    return hashlib.sha256(json.dumps(run_identity(cfg), sort_keys=True).encode()).hexdigest()


def identity_state(cfg) -> dict:
    """What ``state.json`` records of the run's identity: ``fingerprint`` and the ``settings`` behind it."""
    return {"fingerprint": run_fingerprint(cfg), "settings": run_identity(cfg)}


def check_resume(ckpt_dir: Path, cfg) -> None:
    """Refuse to resume checkpoint ``ckpt_dir`` with settings that would change its trajectory; the one-line
    error names each differing setting with both values. Checkpoints written before fingerprints existed are
    compared with the run's ``config.yaml``. Also refuses a ``metrics.jsonl`` holding lines of another shape."""
    from .config import RunConfig, load_config

    ckpt_dir = Path(ckpt_dir)
    run_dir = ckpt_dir.parent.parent
    if (run_dir / "metrics.jsonl").is_file():
        from .report.collect import check_metrics_file

        check_metrics_file(run_dir / "metrics.jsonl")
    state = json.loads((ckpt_dir / "state.json").read_text())
    if state.get("fingerprint") == run_fingerprint(cfg):
        return
    saved = state.get("settings")
    if not isinstance(saved, dict):
        try:
            saved = run_identity(load_config(run_dir / "config.yaml"))
        except DistilleryError:
            return  # an old run without a readable config.yaml: nothing to compare with
    now, default = run_identity(cfg), run_identity(RunConfig())
    changed = [k for k in sorted(set(saved) | set(now))
               if saved.get(k, default.get(k)) != now.get(k, default.get(k))]
    if not changed:
        return
    shown = "; ".join(f"{k}: {saved.get(k, default.get(k))!r} in the run, {now.get(k, default.get(k))!r} now"
                      for k in changed[:4]) + (f" (and {len(changed) - 4} more)" if len(changed) > 4 else "")
    raise DistilleryError(
        f"--resume: {ckpt_dir} was written with other settings ({shown}); resume with the run's own settings "
        f"(distill {run_dir / 'config.yaml'} --resume) or choose another train.output_dir. A resume may change only "
        f"{', '.join(sorted(k for k in RESUMABLE_CHANGES if k.startswith('train.')))[:200]}")
