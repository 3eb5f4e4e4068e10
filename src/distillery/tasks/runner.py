"""``distillery eval --tasks``: BLiMP, answer fidelity and lm-eval tasks for teacher and student, one JSON.

``run_tasks`` loads the teacher with :func:`~distillery.teachers.load_teacher` (a folder, a ``.gguf`` file or
``smollm2``) and the student from its folder (fp32, on the teacher's device, with its own tokenizer when the
folder has one, else the teacher's), runs the in-process tasks, frees both models, then runs the lm-eval
specs in their own process (:mod:`.lm_eval_adapter`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import DistilleryError

TASK_HELP = "blimp, fidelity, lmeval:<shipped task | task YAML | registry task>"


def parse_tasks(tasks: str | list[str]) -> dict:
    """``"blimp,fidelity,lmeval:x,lmeval:y"`` -> ``{"blimp": bool, "fidelity": bool, "lmeval": ["x", "y"]}``."""
    words = [w.strip() for w in (tasks.split(",") if isinstance(tasks, str) else tasks)]
    out = {"blimp": False, "fidelity": False, "lmeval": []}
    for w in words:
        if w in ("blimp", "fidelity"):
            out[w] = True
        elif w.startswith("lmeval:") and w[len("lmeval:"):].strip():
            out["lmeval"].append(w[len("lmeval:"):].strip())
        else:
            raise DistilleryError(f"--tasks: unknown task '{w}' (known: {TASK_HELP})")
    return out


def _load_student(student_dir: str, teacher_tok, device):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sdir = Path(student_dir)
    if not (sdir / "config.json").is_file():
        raise DistilleryError(f"student '{student_dir}' is not a model folder (no config.json)")
    tok = AutoTokenizer.from_pretrained(sdir) if (sdir / "tokenizer_config.json").is_file() else teacher_tok
    model = AutoModelForCausalLM.from_pretrained(sdir, dtype=torch.float32).to(device).eval().requires_grad_(False)
    return model, tok


def run_tasks(teacher: str, student: str, tasks: str | list[str], *, blimp_per_paradigm: int | None = None,
              fidelity_prompts: str | None = None, max_new_tokens: int = 64, sample_temperature: float = 1.0,
              lm_eval_limit: int | None = None, batch_size: int = 16, seed: int = 0, json_out: str | None = None,
              held_out: dict | None = None, progress: bool | None = None) -> dict:
    """Score teacher and student side by side on ``tasks`` (see :func:`parse_tasks`); write ``json_out``.

    Returns ``{"teacher", "student", "tasks", "blimp"?, "fidelity"?, "lm_eval"?, "held_out"?}`` where
    ``blimp`` = ``{"teacher": table, "student": table, "retained_above_chance", "credit"}`` (tables from
    :func:`.blimp.score_blimp`), ``fidelity`` = :func:`.fidelity.score_fidelity`'s result and ``lm_eval`` =
    :func:`.lm_eval_adapter.run_lm_eval`'s. ``held_out`` (the perplexity/KL metrics of ``run_eval``) is
    stored as given.
    """
    which = parse_tasks(tasks)
    prompts = None
    if fidelity_prompts is not None:
        from .fidelity import read_prompts

        prompts = read_prompts(fidelity_prompts)  # read before any model loads: a bad file fails fast
    if json_out is not None:
        from ..checkpoint import ensure_writable_dir

        ensure_writable_dir(Path(json_out).parent if str(Path(json_out).parent) else Path("."), "--json folder")
    result: dict = {"teacher": teacher, "student": student, "tasks": tasks if isinstance(tasks, str) else ",".join(tasks)}
    if held_out is not None:
        result["held_out"] = held_out
    if which["blimp"] or which["fidelity"]:
        from ..teachers import load_teacher

        t = load_teacher(teacher)
        device = next(t.model.parameters()).device
        s_model, s_tok = _load_student(student, t.tokenizer, device)
        if which["blimp"]:
            from .blimp import CREDIT, load_pairs, retained_above_chance, score_blimp

            pairs = load_pairs(per_paradigm=blimp_per_paradigm, seed=seed)
            tb = score_blimp(t.model, t.tokenizer, pairs, batch_size=batch_size, progress=progress, name="teacher")
            sb = score_blimp(s_model, s_tok, pairs, batch_size=batch_size, progress=progress, name="student")
            result["blimp"] = {"teacher": tb, "student": sb, "per_paradigm_pairs": blimp_per_paradigm,
                               "retained_above_chance": retained_above_chance(sb["overall"], tb["overall"]),
                               "credit": CREDIT}
        if which["fidelity"]:
            from .fidelity import score_fidelity

            result["fidelity"] = score_fidelity(t.model, t.tokenizer, s_model, s_tok, prompts,
                                                max_new_tokens=max_new_tokens, sample_temperature=sample_temperature,
                                                seed=seed, batch_size=min(batch_size, 8))
        del t, s_model  # the lm-eval child loads its own copies
    if which["lmeval"]:
        from .lm_eval_adapter import run_lm_eval

        result["lm_eval"] = run_lm_eval(teacher, student, which["lmeval"], batch_size=batch_size, limit=lm_eval_limit,
                                        blimp_per_paradigm=blimp_per_paradigm, seed=seed)
    if json_out is not None:
        p = Path(json_out)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, p)
    return result


def _fmt(v, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}%" if pct else (f"{v:.4g}" if isinstance(v, float) else str(v))


def summary(result: dict) -> str:
    """A few lines for the console: BLiMP, answer fidelity means and lm-eval metrics, teacher beside student."""
    lines = []
    if "blimp" in result:
        b = result["blimp"]
        lines.append(f"BLiMP ({b['teacher']['n_pairs']} pairs, chance 50%): teacher {_fmt(b['teacher']['overall'], True)}"
                     f"  student {_fmt(b['student']['overall'], True)}  kept above chance "
                     f"{_fmt(b['retained_above_chance'], True)}")
        for field, acc in b["teacher"]["per_field"].items():
            lines.append(f"  {field:<18} teacher {_fmt(acc, True):>6}  student {_fmt(b['student']['per_field'][field], True):>6}")
        lines.append(f"  ({b['credit']})")
    if "fidelity" in result:
        f = result["fidelity"]
        lines.append(f"answer fidelity ({f['settings']['n_prompts']} prompts; teacher log-lik nats/byte, ROUGE-L vs "
                     "teacher greedy, distinct-2, longest repeat, distinct char 4-grams, repeat share, empty):")
        for name, m in f["means"].items():
            lines.append(f"  {name:<16} {_fmt(m['teacher_logprob_per_byte']):>8} {_fmt(m['rouge_l']):>7} "
                         f"{_fmt(m['distinct_2']):>7} {_fmt(m['longest_repeated_ngram']):>6} {_fmt(m.get('distinct_char_4')):>7} "
                         f"{_fmt(m.get('repeat_share')):>7} {m['empty_or_whitespace']:>3}")
    for task, entry in result.get("lm_eval", {}).get("tasks", {}).items():
        keys = [k for k in entry.get("teacher", {}) if not k.endswith("_stderr")]
        parts = [f"{k} {_fmt(entry['teacher'].get(k))} / {_fmt(entry.get('student', {}).get(k))}" for k in keys]
        lines.append(f"lm-eval {task} (teacher / student): " + ", ".join(parts))
    return "\n".join(lines)
