"""The Python API: what the command line does, as functions for a notebook or a script.

``import distillery`` exposes these names (imported on first use, so the import itself stays fast)::

    result = distillery.distill("configs/smollm2_student.yaml", train={"max_steps": 50, "output_dir": "runs/nb"})
    result.student_dir                      # Path of the saved student (a plain Hugging Face folder)
    result.summary["validation"]            # the same dict `distillery distill` prints as JSON
    metrics = distillery.evaluate(result, data=["demo:milton"], max_blocks=8)
    report = distillery.export(result, "runs/nb/student.gguf", format="gguf", quant="q8_0")

Each function is the one the matching verb calls: ``distill`` = ``distillery distill`` (after
:func:`~distillery.config.load_config`), ``evaluate`` = ``distillery eval --data``, ``export`` =
``distillery export``. Errors are :class:`~distillery.errors.DistilleryError` with the same one-line
messages the CLI prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import RunConfig, TeacherConfig, _error_line, _read_recipe
from .errors import DistilleryError

SECTIONS = tuple(RunConfig.model_fields)  # teacher, student, data, loss, generation, qat, train


@dataclass
class RunResult:
    """What :func:`distill` returns: where the run wrote its outputs, and its summary."""

    output_dir: Path  # train.output_dir: config.yaml, metrics.jsonl, summary.json, checkpoints/, student/
    student_dir: Path  # the final student, loadable with AutoModelForCausalLM.from_pretrained (no distillery)
    summary: dict  # steps, tokens_seen, validation metrics (also written to summary.json)
    metrics_path: Path  # one JSON record per logged step (and per validation) in metrics.jsonl
    config: RunConfig = field(repr=False)  # the settings the run used (also written to config.yaml)


def configure(recipe: str | Path | RunConfig | dict | None = None, **overrides: Any) -> RunConfig:
    """A validated :class:`RunConfig` from a recipe and Python overrides.

    ``recipe``: a YAML path, a ``RunConfig``, a dict shaped like a recipe, or None (all defaults).
    ``overrides``: a section name with a dict (``train={"max_steps": 20}``, merged key by key into that
    section) or a dotted key (``**{"loss.kd": "jsd"}``). Unknown keys and wrong types raise
    :class:`DistilleryError` naming the key, as the CLI does.
    """
    if isinstance(recipe, RunConfig) and not overrides:
        return recipe  # as given (the CLI's load_config result)
    if isinstance(recipe, RunConfig):
        data, source = recipe.model_dump(exclude_unset=True), "config"  # only what was set: defaults stay defaults
    elif isinstance(recipe, dict):
        data, source = _copy(recipe), "config"
    else:
        source = "config" if recipe is None else str(recipe)
        data = {} if recipe is None else (_read_recipe(Path(recipe)) or {})  # overrides apply before validation
        if not isinstance(data, dict):
            raise DistilleryError(f"{recipe}: a recipe must be a mapping of sections, got {type(data).__name__}")
    for key, value in overrides.items():
        path = key.split(".")
        if len(path) == 1 and key not in SECTIONS:
            raise DistilleryError(f"override '{key}' is neither a section ({', '.join(SECTIONS)}) nor a dotted "
                                  "key such as 'train.max_steps'")
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise DistilleryError(f"override '{key}': '{part}' is not a section")
        last = path[-1]
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            node[last] = {**node[last], **_copy(value)}  # a section given as a dict updates that section
        else:
            node[last] = _copy(value)
    from pydantic import ValidationError

    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise DistilleryError(_error_line(err, source)) from None


def distill(recipe: str | Path | RunConfig | dict | None = None, *, resume: bool = False,
            **overrides: Any) -> RunResult:
    """Distill the teacher into the student a recipe describes (``distillery distill RECIPE``).

    ``recipe`` and ``overrides`` as in :func:`configure`; ``resume=True`` continues from the newest
    checkpoint in ``train.output_dir`` (``--resume``). Returns a :class:`RunResult`. Under
    ``accelerate launch`` every process calls it and gets the same paths.
    """
    from .train import distill as run_loop

    cfg = configure(recipe, **overrides)
    summary = run_loop(cfg, resume=resume)
    out = Path(cfg.train.output_dir)
    return RunResult(output_dir=out, student_dir=out / "student", summary=summary,
                     metrics_path=out / "metrics.jsonl", config=cfg)


def evaluate(student: str | Path | RunResult, data: list[str] | str, teacher: str | TeacherConfig | None = None,
             *, seq_len: int = 256, batch_size: int = 4, max_blocks: int | None = None,
             json_out: str | Path | None = None, progress: bool = False, own_samples: int = 0,
             prompt_tokens: int = 64, sample_temperature: float = 1.0) -> dict:
    """Score a student against its teacher on held-out text (``distillery eval --data``).

    ``student``: a student folder, or a :class:`RunResult` (its ``student_dir``; its teacher when
    ``teacher`` is None). ``teacher``: a source string (folder, ``.gguf``, ``smollm2``) or a
    ``TeacherConfig`` (kind ``hf`` or ``served``); default ``smollm2``. ``data``: text/JSONL files or
    ``demo:milton``. Returns ``teacher_perplexity``, ``student_perplexity``, ``kl_teacher_student``
    (mean over target positions of Σ_v p_T(v) log(p_T(v)/q_S(v)), nats), ``top1_agreement``, ``tokens``
    (see :mod:`distillery.evaluate`). ``max_blocks`` caps the blocks scored (all of them by default).
    """
    from .evaluate import run_eval

    if isinstance(student, RunResult):
        teacher = student.config.teacher if teacher is None else teacher
        student = student.student_dir
    data = [data] if isinstance(data, (str, Path)) else list(data)
    return run_eval("smollm2" if teacher is None else teacher, str(student), [str(d) for d in data],
                    seq_len=seq_len, batch_size=batch_size, max_blocks=max_blocks,
                    json_out=None if json_out is None else str(json_out), progress=progress,
                    own_samples=own_samples, prompt_tokens=prompt_tokens, sample_temperature=sample_temperature)


def export(student: str | Path | RunResult, out: str | Path, format: str = "gguf", quant: str | None = None,
           *, verify: bool = True, verify_text: str | None = None, verify_tokens: int = 512) -> dict:
    """Export a student folder to a device format (``distillery export STUDENT OUT --format F``).

    ``quant`` defaults as on the command line (f16 for GGUF, f32 for ONNX). With ``verify`` the export
    is loaded in its runtime and its logits compared with PyTorch's; returns the export report.
    """
    from .export import export_model

    if isinstance(student, RunResult):
        student = student.student_dir
    quant = quant or ("f16" if format == "gguf" else "f32")
    return export_model(student, format, out, quant=quant, verify=verify, verify_text=verify_text,
                        verify_tokens=verify_tokens)


def _copy(value):
    """A deep copy of plain recipe data (dicts and lists), so a caller's dict is never changed."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
