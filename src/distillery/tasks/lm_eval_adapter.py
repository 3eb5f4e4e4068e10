"""Task scores through EleutherAI's lm-evaluation-harness (``pip install 'distillery[eval]'``, lm-eval 0.4.13).

``run_lm_eval(teacher, student, specs)`` scores both models on the same tasks and returns
``{"tasks": {task: {"teacher": {metric: value}, "student": {...}}}, "hf_home", "offline", "lm_eval_version"}``.
A spec is one of:

- a task shipped with distillery, written out on demand (works offline):
  ``distillery_blimp`` (BLiMP as a multiple-choice task: choices ``[good, bad]``, empty context, no target
  delimiter, so it scores exactly like :mod:`distillery.tasks.blimp`) and ``distillery_milton``
  (bits per byte, byte and word perplexity of 24 passages of Paradise Lost, by rolling log-likelihood);
- a path to a task YAML (``dataset_path: json`` with local ``data_files`` works offline; relative
  ``data_files`` resolve from the current folder);
- a task or group name from lm-eval's registry (needs its data set from the hub or already cached).

lm-eval runs in a child process (``python -m distillery.tasks.lm_eval_adapter spec.json out.json``) whose
``HF_HOME`` is distillery's own folder (``$DISTILLERY_HF_HOME``, default ``$DISTILLERY_HOME/hf``): the
Hugging Face libraries read it once, at import, so a child is the only reliable way to keep their caches
out of the user's own. When every spec is local the child also runs with ``HF_DATASETS_OFFLINE=1`` and
``HF_HUB_OFFLINE=1``, so nothing waits on a network.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

from ..errors import DistilleryError

SHIPPED = ("distillery_blimp", "distillery_milton")
_MILTON_DOCS, _MILTON_LINES = 24, 20


def hf_home() -> Path:
    from ..teachers import distillery_home

    return Path(os.environ.get("DISTILLERY_HF_HOME") or distillery_home() / "hf")


def _write(path: Path, text: str) -> None:
    """Write atomically: two runs may materialise the same shipped task at once."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _milton_docs() -> list[str]:
    """24 passages of 20 lines, evenly spaced through Paradise Lost (trailing spaces trimmed)."""
    with (resources.files("distillery") / "assets" / "paradise_lost.txt.gz").open("rb") as fh:
        lines = [ln.rstrip() for ln in gzip.decompress(fh.read()).decode("utf-8").splitlines() if ln.strip()]
    step = (len(lines) - _MILTON_LINES) // (_MILTON_DOCS - 1)
    return ["\n".join(lines[i * step:i * step + _MILTON_LINES]) for i in range(_MILTON_DOCS)]


def materialize_shipped(name: str, root: Path, *, blimp_per_paradigm: int | None = None, seed: int = 0) -> Path:
    """Write shipped task ``name`` (YAML + JSONL with absolute paths) under ``root``; return its folder.

    The folder name carries the BLiMP subsample (``distillery_blimp-n50-s0``), so two runs asking for different
    subsamples never overwrite each other's data file."""
    folder = root / (f"{name}-{'all' if blimp_per_paradigm is None else f'n{blimp_per_paradigm}'}-s{seed}"
                     if name == "distillery_blimp" else name)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data.jsonl"
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\ntest_split: test\n"
    if name == "distillery_blimp":
        from .blimp import load_pairs

        rows = [{"uid": p["uid"], "field": p["field"], "good": p["good"], "bad": p["bad"]}
                for p in load_pairs(per_paradigm=blimp_per_paradigm, seed=seed)]
        yaml = (f"task: {name}\n{common}output_type: multiple_choice\ndoc_to_text: \"\"\n"
                "doc_to_choice: \"{{[good, bad]}}\"\ndoc_to_target: 0\ntarget_delimiter: \"\"\n"
                "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
                "metadata:\n  version: 1.0\n")
    elif name == "distillery_milton":
        rows = [{"text": t} for t in _milton_docs()]
        yaml = (f"task: {name}\n{common}output_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
                "doc_to_target: \"{{text}}\"\nmetric_list:\n  - metric: bits_per_byte\n  - metric: byte_perplexity\n"
                "  - metric: word_perplexity\nmetadata:\n  version: 1.0\n")
    else:
        raise DistilleryError(f"no shipped lm-eval task '{name}' (shipped: {', '.join(SHIPPED)})")
    _write(data, "".join(json.dumps(r) + "\n" for r in rows))
    _write(folder / f"{name}.yaml", yaml)
    return folder


def _yaml_task_names(path: Path) -> list[str]:
    """The ``task`` (or ``group``) names a task YAML defines; lm-eval tags such as ``!function`` are skipped."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    try:
        loader = Loader(path.read_text(encoding="utf-8"))  # a SafeLoader that ignores lm-eval's !function tags
        try:
            cfg = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise DistilleryError(f"{path}{line}: not valid YAML ({str(exc).splitlines()[0]})") from None
    name = cfg.get("task", cfg.get("group")) if isinstance(cfg, dict) else None
    names = name if isinstance(name, list) else [name]
    if not names or not all(isinstance(n, str) and n for n in names):
        raise DistilleryError(f"{path}: an lm-eval task YAML needs a 'task:' (or 'group:') name")
    return names


def resolve_specs(specs: list[str], work: Path, *, blimp_per_paradigm: int | None = None, seed: int = 0) -> dict:
    """Map specs to ``{"tasks": [names], "include_paths": [folders], "registry": bool}`` (see module docstring)."""
    names, paths, registry = [], [], False
    for spec in specs:
        if spec in SHIPPED:
            paths.append(str(materialize_shipped(spec, work, blimp_per_paradigm=blimp_per_paradigm, seed=seed)))
            names.append(spec)
        elif spec.endswith((".yaml", ".yml")) or os.sep in spec:
            p = Path(spec).expanduser().resolve()
            if not p.is_file():
                raise DistilleryError(f"lm-eval task file '{spec}' does not exist")
            paths.append(str(p.parent))
            names.extend(_yaml_task_names(p))
        else:
            names.append(spec)
            registry = True
    return {"tasks": names, "include_paths": sorted(set(paths)), "registry": registry}


def run_lm_eval(teacher: str, student: str, specs: list[str], *, batch_size: int = 16, limit: int | None = None,
                blimp_per_paradigm: int | None = None, seed: int = 0, keep_samples: bool = False) -> dict:
    """Score ``teacher`` (anything :func:`~distillery.teachers.load_teacher` opens) and ``student`` (a model
    folder) on ``specs`` in one lm-eval child process; see the module docstring for specs and caches.

    ``limit`` caps the documents per task (lm-eval's ``--limit``). With ``keep_samples`` each task also carries
    ``samples``: per document, lm-eval's filtered responses (log-likelihoods or generations) and target.
    """
    try:
        import lm_eval  # noqa: F401  (checked here, used in the child)
    except ModuleNotFoundError:
        raise DistilleryError("lm-eval tasks need lm-evaluation-harness: pip install 'distillery[eval]'") from None
    home = hf_home()
    home.mkdir(parents=True, exist_ok=True)
    from ..teachers import distillery_home

    resolved = resolve_specs(specs, distillery_home() / "lm_eval_tasks", blimp_per_paradigm=blimp_per_paradigm,
                             seed=seed)
    env = dict(os.environ, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false")
    env.pop("HF_DATASETS_CACHE", None)  # these would override HF_HOME for datasets and the hub
    env.pop("HF_HUB_CACHE", None)
    if not resolved["registry"]:
        env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    with tempfile.TemporaryDirectory(prefix="distillery-lmeval-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps({**resolved, "teacher": teacher, "student": student, "batch_size": batch_size,
                                         "limit": limit, "seed": seed, "keep_samples": keep_samples}))
        rc, tail = _run_child([sys.executable, "-m", "distillery.tasks.lm_eval_adapter", str(spec_path),
                               str(out_path)], env)
        if rc != 0 or not out_path.is_file():
            last = [ln for ln in tail.strip().splitlines() if ln.strip()]
            why = last[-1].removeprefix("error: ") if last else f"exit status {rc}"
            raise DistilleryError(f"lm-eval failed on {', '.join(specs)}: {why}")
        result = json.loads(out_path.read_text())
    result.update({"hf_home": str(home), "offline": not resolved["registry"], "specs": list(specs)})
    return result


def _run_child(cmd: list[str], env: dict) -> tuple[int, str]:
    """Run ``cmd``, streaming its stdout and stderr to our stderr as they come (lm-eval's progress bars; the
    CLI's stdout carries only its own result); return the exit status and the last 4 kB of the output."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tail = b""
    out = getattr(sys.stderr, "buffer", None)
    while chunk := os.read(proc.stdout.fileno(), 65536):
        tail = (tail + chunk)[-4096:]
        if out is not None:
            out.write(chunk)
            out.flush()
        else:
            sys.stderr.write(chunk.decode("utf-8", "replace"))
    proc.stdout.close()
    return proc.wait(), tail.decode("utf-8", "replace")


def _task_metrics(res: dict) -> dict:
    """lm-eval's ``{"acc,none": v, "acc_stderr,none": s, ...}`` as ``{"acc": v, "acc_stderr": s}``."""
    out = {}
    for key, value in res.items():
        if "," in key and isinstance(value, (int, float)):
            metric, filt = key.split(",", 1)
            out[metric if filt == "none" else f"{metric},{filt}"] = value
    return out


def _child(spec_path: str, out_path: str) -> None:
    """Child process body: load each model, run ``simple_evaluate`` on the spec's tasks, write one JSON."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from ..teachers import load_teacher

    spec = json.loads(Path(spec_path).read_text())
    manager = TaskManager(include_path=spec["include_paths"] or None, include_defaults=spec["registry"])
    teacher = load_teacher(spec["teacher"])
    device = next(teacher.model.parameters()).device
    sdir = Path(spec["student"])
    if not (sdir / "config.json").is_file():
        raise DistilleryError(f"student '{sdir}' is not a model folder (no config.json)")
    s_tok = AutoTokenizer.from_pretrained(sdir) if (sdir / "tokenizer_config.json").is_file() else teacher.tokenizer
    student = AutoModelForCausalLM.from_pretrained(sdir, dtype=torch.float32).to(device).eval()
    tasks: dict[str, dict] = {}
    for role, model, tok in (("teacher", teacher.model, teacher.tokenizer), ("student", student, s_tok)):
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=spec["batch_size"])
        res = lm_eval.simple_evaluate(model=lm, tasks=spec["tasks"], task_manager=manager, limit=spec["limit"],
                                      log_samples=spec["keep_samples"], bootstrap_iters=1000,
                                      random_seed=spec["seed"], numpy_random_seed=spec["seed"],
                                      torch_random_seed=spec["seed"], fewshot_random_seed=spec["seed"])
        for task, metrics in res["results"].items():
            entry = tasks.setdefault(task, {})
            entry[role] = _task_metrics(metrics)
            entry["n_docs"] = res.get("n-samples", {}).get(task, {}).get("effective")
            if spec["keep_samples"] and task in res.get("samples", {}):
                entry.setdefault("samples", {})[role] = [
                    {"doc_id": s["doc_id"], "target": s["target"], "resps": s["filtered_resps"]}
                    for s in res["samples"][task]]
    Path(out_path).write_text(json.dumps({"tasks": tasks, "lm_eval_version": lm_eval.__version__}, default=str))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m distillery.tasks.lm_eval_adapter SPEC.json OUT.json")
    try:
        _child(sys.argv[1], sys.argv[2])
    except DistilleryError as exc:
        sys.exit(f"error: {exc}")
