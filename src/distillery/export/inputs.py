"""Inputs shared by export, quantize and bench: loading a student folder and the held-out text.

Importing this module does not import torch (the benchmark worker uses :func:`heldout_text`
in processes that must not pay for torch). A *student folder* is what ``save_pretrained`` writes (``config.json``, ``model.safetensors``) plus
the tokenizer files. Everything a user can get wrong here (missing folder, no config, no tokenizer,
an architecture we cannot convert) raises :class:`DistilleryError` with a one-line message.
"""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path

from ..errors import DistilleryError

# Architectures export/quantize/bench read (architecture -> model_type); each exporter refuses, in one line, a
# family it does not write (gguf_families.FAMILIES; apple_export.FAMILIES). = the student families.
SUPPORTED_ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                   "Qwen3ForCausalLM": "qwen3", "GemmaForCausalLM": "gemma", "Gemma2ForCausalLM": "gemma2",
                   "Gemma3ForCausalLM": "gemma3_text", "Phi3ForCausalLM": "phi3"}


def check_student_dir(student_dir: str | Path) -> Path:
    """Return the folder as a Path after checking that it looks like a saved HF causal LM."""
    path = Path(student_dir).expanduser()
    if not path.exists():
        raise DistilleryError(f"student folder '{student_dir}' does not exist")
    if not path.is_dir():
        raise DistilleryError(f"student '{student_dir}' is a file; give the folder written by save_pretrained")
    if not (path / "config.json").is_file():
        raise DistilleryError(f"student folder '{student_dir}' has no config.json")
    return path


def student_arch(student_dir: Path) -> str:
    """The HF architecture name from config.json; refuse anything outside ``SUPPORTED_ARCHS``."""
    try:
        config = json.loads((student_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DistilleryError(f"{student_dir / 'config.json'}: unreadable ({exc})".splitlines()[0]) from None
    archs = config.get("architectures") or [f"<model_type {config.get('model_type')!r}>"]
    arch = archs[0]
    if arch not in SUPPORTED_ARCHS:
        raise DistilleryError(f"{student_dir}: architecture {arch} is not supported for export/quantization "
                              f"(supported: {', '.join(SUPPORTED_ARCHS)})")
    return arch


def load_student(student_dir: str | Path, need_tokenizer: bool = True):
    """Load ``(model, tokenizer)`` from a student folder in fp32, eval mode, on CPU.

    The architecture is checked first so an unsupported model fails before its weights are read.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = check_student_dir(student_dir)
    student_arch(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise DistilleryError(f"{path}: cannot load the model ({exc})".splitlines()[0]) from None
    tokenizer = None
    if need_tokenizer:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, TypeError) as exc:
            raise DistilleryError(f"{path}: no usable tokenizer next to the model ({exc})".splitlines()[0]) from None
    return model.eval(), tokenizer


def heldout_text(n_chars: int = 20_000) -> str:
    """The last ``n_chars`` characters of the bundled *Paradise Lost* (Milton).

    The tail of the poem is the default held-out text: the demo recipes train on Shakespeare, and a
    Milton split, if used, is cut from the front.
    """
    path = resources.files("distillery") / "assets" / "paradise_lost.txt.gz"
    with path.open("rb") as fh:
        text = gzip.decompress(fh.read()).decode("utf-8")
    return text[-n_chars:]


def heldout_ids(tokenizer, n_tokens: int, text: str | None = None) -> list[int]:
    """``n_tokens`` token ids of ``text`` (default: :func:`heldout_text`), without special tokens."""
    text = text if text is not None else heldout_text(max(20_000, n_tokens * 8))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < n_tokens:
        raise DistilleryError(f"held-out text has {len(ids)} tokens, fewer than the {n_tokens} asked for")
    return list(ids[:n_tokens])
