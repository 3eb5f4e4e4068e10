"""``distillery prune TEACHER OUT --layers N --hidden H --ffn F --heads A``: prune, save, report.

The verb loads the teacher (any source ``distillery.teachers.load_teacher`` accepts: a folder, a
``.gguf`` file, ``smollm2``), tokenizes calibration text, prunes, and writes a plain Hugging Face
folder (safetensors + tokenizer) plus ``pruning.json`` (kept layers, sizes, depth scores).
"""

from __future__ import annotations

import argparse
import gzip
import json
from importlib import resources
from pathlib import Path

import torch

from ..errors import DistilleryError

DEMO_FILES = {"demo:shakespeare": "shakespeare8.txt.gz", "demo:milton": "paradise_lost.txt.gz"}


def _read_text(source: str) -> str:
    """Text of a demo corpus, a .txt/.gz file, or the ``text`` fields of a .jsonl file."""
    if source in DEMO_FILES:
        with (resources.files("distillery") / "assets" / DEMO_FILES[source]).open("rb") as fh:
            return gzip.decompress(fh.read()).decode("utf-8")
    path = Path(source)
    if not path.is_file():
        raise DistilleryError(f"calibration data '{source}' does not exist")
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    if path.suffix == ".jsonl" or path.name.endswith(".jsonl.gz"):
        parts = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    parts.append(str(json.loads(line).get("text", "")))
                except (json.JSONDecodeError, AttributeError):
                    raise DistilleryError(f"{source}:{n}: not a JSON object") from None
        text = "\n\n".join(parts)
    return text


def calibration_batches(data: list[str], tokenizer, *, seq_len: int = 256, batch_size: int = 8,
                        n_batches: int = 8) -> list[dict]:
    """Up to ``n_batches`` batches of ``batch_size`` blocks of ``seq_len`` tokens from ``data``.

    Uses ``distillery.data.build_datasets`` (the training data path: same files, same blocks) when
    that part is installed; otherwise reads plain text and cuts the token stream into blocks.
    Each batch: ``input_ids (B, seq_len)``, ``attention_mask (B, seq_len)`` (and ``labels`` via data).
    """
    want = batch_size * n_batches
    try:
        from ..data import build_datasets  # the shared data path, when present
    except ImportError:
        build_datasets = None
    if build_datasets is not None:
        from ..config import DataConfig

        splits = build_datasets(DataConfig(train=list(data), seq_len=seq_len, max_train_blocks=want), tokenizer)
        items = [splits.train[i] for i in range(min(want, len(splits.train)))]
        keys = [k for k in ("input_ids", "attention_mask", "labels") if k in items[0]] if items else []
        blocks = [{k: torch.as_tensor(it[k]) for k in keys} for it in items]
    else:
        ids = tokenizer("\n\n".join(_read_text(s) for s in data), add_special_tokens=False)["input_ids"]
        ids = torch.tensor(ids[:want * seq_len], dtype=torch.long)
        blocks = [{"input_ids": b, "attention_mask": torch.ones_like(b)}
                  for b in ids.split(seq_len) if b.numel() == seq_len]
    if not blocks:
        raise DistilleryError(f"calibration data {data} holds fewer than {seq_len} tokens")
    return [{k: torch.stack([b[k] for b in blocks[i:i + batch_size]]) for k in blocks[0]}
            for i in range(0, len(blocks), batch_size)]


def save_student(model, tokenizer, out: Path, extra: dict | None = None) -> None:
    """Write ``model`` (safetensors), ``tokenizer`` and ``pruning.json`` to ``out`` atomically."""
    from ..checkpoint import atomic_folder

    with atomic_folder(out, f"the pruned student to {out}") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra is not None:
            (tmp / "pruning.json").write_text(json.dumps(extra, indent=2))


def prune_main(teacher, out: str | Path, *, layers: int | None = None, hidden: int | None = None,
               ffn: int | None = None, heads: int | None = None, kv_heads: int | None = None,
               method: str = "block_importance", contiguous: bool = False, data: list[str] | None = None,
               calib: list[dict] | None = None, tokenizer=None, seq_len: int = 256, batch_size: int = 8,
               calibration_batches_n: int = 8, device: str = "auto", dtype: str = "float32") -> dict:
    """Prune ``teacher`` and save the student to ``out``; returns the summary written to ``pruning.json``.

    ``teacher``: a source string for ``load_teacher``, a loaded ``Teacher`` (``.model``, ``.tokenizer``),
    or a bare HF model (pass ``tokenizer``). Calibration: ``calib`` batches if given, else ``data``
    (default ``demo:shakespeare``) tokenized into ``calibration_batches_n`` × ``batch_size`` blocks.
    """
    from . import prune_model
    from ..students import count_parameters

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DistilleryError(f"output folder '{out}' already exists and is not empty")
    if isinstance(teacher, (str, Path)):
        from ..config import TeacherConfig
        from ..teachers import open_teacher

        teacher = open_teacher(TeacherConfig(source=str(teacher), dtype=dtype), device)
    model = teacher if isinstance(teacher, torch.nn.Module) else teacher.model  # bare model or Teacher
    tokenizer = tokenizer or getattr(teacher, "tokenizer", None)
    if calib is None:
        if tokenizer is None:
            raise DistilleryError("prune: calibration text needs a tokenizer (pass tokenizer= with a bare model)")
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit and seq_len > limit:
            raise DistilleryError(f"--seq-len {seq_len} is above the teacher's max_position_embeddings={limit}")
        calib = calibration_batches(data or ["demo:shakespeare"], tokenizer, seq_len=seq_len,
                                    batch_size=batch_size, n_batches=calibration_batches_n)
    student = prune_model(model, calib, layers=layers, hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv_heads,
                          method=method, contiguous=contiguous)
    summary = {"teacher_parameters": count_parameters(model), "student_parameters": count_parameters(student),
               **student.prune_plan}
    save_student(student, tokenizer, out, summary)
    return {"output": str(out), **{k: v for k, v in summary.items() if k != "depth_scores"}}


def _cmd_prune(args) -> int:
    summary = prune_main(args.teacher, args.out, layers=args.layers, hidden=args.hidden, ffn=args.ffn,
                         heads=args.heads, kv_heads=args.kv_heads, method=args.method, contiguous=args.contiguous,
                         data=args.data, seq_len=args.seq_len, batch_size=args.batch_size,
                         calibration_batches_n=args.calibration_batches, device=args.device, dtype=args.dtype)
    print(json.dumps(summary, indent=2))
    return 0


def add_prune_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``distillery prune`` on an argparse ``subparsers`` object; the handler is ``args.func``."""
    p = subparsers.add_parser("prune", help="cut a smaller student out of the teacher (Minitron-style depth/width pruning)")
    p.add_argument("teacher", help="teacher folder, .gguf file, or 'smollm2'")
    p.add_argument("out", help="output folder for the pruned student (must not exist or be empty)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers to keep (default: all)")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (embedding channels) to keep")
    p.add_argument("--ffn", type=int, default=None, help="MLP intermediate size to keep")
    p.add_argument("--heads", type=int, default=None, help="attention (query) heads to keep; whole KV groups are kept")
    p.add_argument("--kv-heads", type=int, default=None, help="KV heads to keep (default: as many as --heads allows)")
    p.add_argument("--method", choices=["block_importance", "loss"], default="block_importance",
                   help="depth ranking: cosine block importance (one pass) or calibration loss per removed layer")
    p.add_argument("--contiguous", action="store_true", help="drop one contiguous block of layers")
    p.add_argument("--data", nargs="+", default=["demo:shakespeare"], help="calibration text: files or demo:shakespeare")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--calibration-batches", type=int, default=8)
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda:0', ...")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="float32",
                   help="teacher dtype while pruning (the student is saved in it)")
    p.set_defaults(func=_cmd_prune)
    return p
