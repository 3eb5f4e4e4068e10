"""Experiment trackers (TensorBoard, Weights & Biases, MLflow, Trackio, ...) through Accelerate's trackers.

``train.report_to`` names them as Accelerate does. The loop passes :func:`accelerator_kwargs` to its
``Accelerator`` and calls :func:`start`, :func:`log` and :func:`finish`; every record written to
``metrics.jsonl`` goes to the trackers too, training records with their keys under ``train/`` and
validation records under ``val/``, at the record's optimizer step. Only the main process reports
(Accelerate's trackers run there).

TensorBoard writes event files to ``<output_dir>/logs/distillery``; the hosted ones take their own
settings from the environment (``WANDB_MODE=offline``, ``MLFLOW_TRACKING_URI``, ...).
"""

from __future__ import annotations

import math
from pathlib import Path

from .errors import DistilleryError

PROJECT = "distillery"  # Accelerate's project name: the W&B / MLflow project, TensorBoard's sub-folder
_PACKAGES = {"tensorboard": "tensorboard (or tensorboardX)", "comet_ml": "comet-ml"}


def check_available(names: list[str]) -> None:
    """Refuse a tracker whose package is missing, before anything loads (Accelerate would skip it silently)."""
    if not names:
        return
    from accelerate.tracking import get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    missing = [n for n in names if n not in available]
    if missing:
        pkgs = ", ".join(_PACKAGES.get(n, n) for n in missing)
        raise DistilleryError(f"train.report_to names {', '.join(missing)}, but its package is not installed "
                              f"(pip install {pkgs}); or remove it from train.report_to")


def accelerator_kwargs(names: list[str], output_dir: str | Path) -> dict:
    """``Accelerator(**...)`` arguments: the trackers and where file-based ones write."""
    if not names:
        return {}
    from accelerate.utils import ProjectConfiguration

    out = Path(output_dir)
    return {"log_with": list(names),
            "project_config": ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs"))}


def start(acc, names: list[str], cfg, run_name: str) -> None:
    """Open the trackers with the run's settings as hyper-parameters (flattened: ``loss.kd``, ``train.lr``...)."""
    if not names:
        return
    init = {"wandb": {"name": run_name}, "mlflow": {"run_name": run_name}, "trackio": {"name": run_name}}
    acc.init_trackers(PROJECT, config=hparams(cfg.model_dump(mode="json")),
                      init_kwargs={k: v for k, v in init.items() if k in names})


def log(acc, names: list[str], rec: dict) -> None:
    """One ``metrics.jsonl`` record to the trackers, at its step: its finite numbers, bools as 0/1."""
    if not names:
        return
    prefix = "val/" if rec.get("split") == "val" else "train/"
    values = {prefix + k: float(v) for k, v in rec.items()
              if k not in ("step", "split") and isinstance(v, (int, float)) and math.isfinite(v)}
    acc.log(values, step=int(rec["step"]))


def finish(acc, names: list[str]) -> None:
    """Close the trackers (flush files, end the hosted run). ``acc.end_training()`` would also tear down the
    process group, which the loop does itself after its last collective."""
    for tracker in acc.trackers if names else []:
        tracker.finish()


def hparams(settings: dict, prefix: str = "") -> dict:
    """Nested settings as one flat mapping of scalars (TensorBoard's hparams take bool, str, int, float only):
    ``{"loss": {"kd": "jsd"}}`` -> ``{"loss.kd": "jsd"}``; lists and None as text."""
    flat = {}
    for k, v in settings.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            flat.update(hparams(v, key + "."))
        elif isinstance(v, (bool, int, float, str)):
            flat[key] = v
        else:
            flat[key] = str(v)
    return flat
