"""Checks on a command's inputs before anything heavy loads (called by the CLI, after parsing).

Each check reads only headers, manifests and folder listings, so a bad input costs a second, not a
teacher load:

* weights files: every ``*.safetensors`` of a model folder has a whole header and exactly the bytes it
  promises (a truncated file is named, instead of safetensors' ``incomplete metadata`` deep in a load);
  a folder whose weights exist only as a pickle (``pytorch_model.bin``, ``*.pt``) is refused: distillery
  never unpickles model weights (unpickling runs arbitrary code);
* a recipe's inputs: the teacher and ``student.pretrained`` folders as above; a pretrained student larger
  than its teacher (parameters counted from the headers); a teacher cache written by another teacher than
  the one the recipe names; ``train.output_dir`` that is one of the run's inputs;
* long silent phases: a note before a step that runs very many micro-batches.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

from .errors import DistilleryError
from .locks import refuse_overwrite

PICKLE_PATTERNS = ("pytorch_model*.bin", "model*.bin", "*.pt", "*.pth", "*.ckpt")
_MAX_HEADER = 100 << 20  # safetensors itself refuses headers above 100 MB
MANY_MICRO_BATCHES = 512  # a step of more micro-batches than this gets a note before it starts


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a ``.safetensors`` file's framing (None if nothing): an 8-byte little-endian header
    length ``n``, ``n`` bytes of JSON, then exactly ``max(data_offsets)`` bytes of tensor data."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"has {size} bytes, fewer than a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                return f"has {size} bytes but its header claims {n} (truncated, or not a safetensors file)"
            header = json.loads(fh.read(n))
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    except (ValueError, UnicodeDecodeError):
        return "has a damaged header (not JSON)"
    if not isinstance(header, dict):
        return "has a damaged header (not a JSON object)"
    try:
        end = max((int(m["data_offsets"][1]) for k, m in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        return "has a damaged header (a tensor without data_offsets)"
    if 8 + n + end != size:
        return f"has {size} bytes, its header describes {8 + n + end} (truncated or damaged)"
    return None


def safetensors_parameters(folder: Path) -> int | None:
    """Parameters stored in a folder's ``*.safetensors`` files (from the headers), None if it has none."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            for key, meta in json.loads(fh.read(n)).items():
                if key != "__metadata__":
                    count = 1
                    for d in meta["shape"]:
                        count *= int(d)
                    total += count
    return total


def check_weights_folder(folder: str | Path, what: str) -> None:
    """One-line error for a model folder whose weights are truncated, damaged, or only a pickle."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in folder.glob(pattern))
        if pickles:
            raise DistilleryError(f"{what} '{folder}' holds its weights only as a pickle ({pickles[0]}): distillery "
                                  "never unpickles model weights (unpickling can run any code); convert them to "
                                  "model.safetensors with a tool you trust")
        return
    for f in files:
        problem = safetensors_problem(f)
        if problem:
            raise DistilleryError(f"{what}: weights file '{f}' {problem}; copy or export it again")


def check_args(args) -> None:
    """Pre-flight checks for a parsed command line: every model folder it names, and a recipe's inputs."""
    for attr in ("teacher", "student", "models"):
        values = getattr(args, attr, None)
        for v in values if isinstance(values, list) else [values]:
            if isinstance(v, str) and (Path(v).expanduser() / "config.json").is_file():
                check_weights_folder(v, attr if attr != "models" else "model")
    command = getattr(args, "command", None)
    if command == "eval" and getattr(args, "json", None):
        refuse_overwrite(args.json, {"the student": args.student, "the teacher": args.teacher}, "eval --json")
    if command == "quantize" and getattr(args, "out", None):
        refuse_overwrite(args.out, {"the student folder": args.student}, "quantize --out")
    if command in ("distill", "cache") and getattr(args, "recipe", None):
        from .config import load_config

        check_recipe(load_config(args.recipe, args.overrides), writes_run=command == "distill")


def _teacher_name(source: str) -> str:
    """The name a live teacher records as its identity (``teachers.hf.resolve_source``'s display name)."""
    if source == "smollm2":
        return "SmolLM2-135M-Instruct"
    p = Path(source).expanduser()
    return p.stem if p.suffix == ".gguf" else (p.name if p.is_dir() else source)


def check_recipe(cfg, writes_run: bool = True) -> None:
    """A recipe's inputs, before any of them loads (see the module docstring); ``writes_run``: the command
    trains into ``train.output_dir`` (distill; not cache)."""
    tcfg, scfg, tc = cfg.teacher, cfg.student, cfg.train
    teacher_dir = Path(tcfg.source).expanduser() if tcfg.kind == "hf" and tcfg.source != "smollm2" else None
    if teacher_dir is not None and teacher_dir.is_dir():
        check_weights_folder(teacher_dir, "teacher")
    if scfg.init == "pretrained" and scfg.pretrained and Path(scfg.pretrained).expanduser().is_dir():
        sdir = Path(scfg.pretrained).expanduser()
        check_weights_folder(sdir, "student.pretrained")
        n_s = safetensors_parameters(sdir)
        n_t = safetensors_parameters(teacher_dir) if teacher_dir is not None and teacher_dir.is_dir() else None
        if n_s and n_t and n_s > n_t:
            raise DistilleryError(f"student.pretrained '{scfg.pretrained}' has {n_s / 1e6:,.2f}M parameters, more than "
                                  f"its teacher ({n_t / 1e6:,.2f}M): a student must be smaller than its teacher")
    if tcfg.kind == "cache" and tcfg.cache_path and "source" in tcfg.model_fields_set:
        manifest = Path(tcfg.cache_path).expanduser() / "manifest.json"
        try:
            recorded = json.loads(manifest.read_text(encoding="utf-8")).get("teacher", {}).get("name")
        except (OSError, ValueError, AttributeError):
            recorded = None  # a missing or damaged manifest is the cache reader's to report
        if recorded is not None and recorded != _teacher_name(tcfg.source):
            raise DistilleryError(f"teacher cache '{tcfg.cache_path}' was written by teacher '{recorded}', but "
                                  f"teacher.source names '{_teacher_name(tcfg.source)}': rewrite the cache with "
                                  "`distillery cache`, or point teacher.source at the teacher that wrote it")
    if not writes_run:
        return
    out = Path(tc.output_dir).expanduser().resolve()
    inputs = {"the teacher folder": teacher_dir, "student.pretrained": scfg.pretrained,
              "the teacher cache": tcfg.cache_path if tcfg.kind == "cache" else None}
    for name, path in inputs.items():
        if path and Path(path).expanduser().resolve() == out:
            raise DistilleryError(f"train.output_dir '{tc.output_dir}' is {name}: a run would write into its own "
                                  "input; choose another train.output_dir")
    if tc.grad_accum > MANY_MICRO_BATCHES and os.environ.get("RANK", "0") == "0":
        print(f"note: train.grad_accum={tc.grad_accum}: every optimizer step runs {tc.grad_accum} micro-batches of "
              f"{tc.micro_batch_size} blocks before its progress line (the first one takes a while)", file=sys.stderr)
