"""What ``distillery plan`` needs to know about a recipe's models and machine, without loading weights.

* :func:`model_shapes`: the teacher's and the student's Hugging Face configs and parameter counts,
  built from the recipe. Configs come from ``config.json`` (a local folder, a hub id), from a GGUF
  file's header (read here directly: ``gguf.GGUFReader`` and transformers parse every token string
  and take ~20-40 s for a 49k vocabulary) or from a teacher cache's manifest. Parameters are counted
  on the ``meta`` device (no memory, no initialisation).
* :func:`device_memory_bytes`: GPU memory, or the RAM available now.
* :func:`probe_tflops`: a short matmul probe of the device's dense throughput.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import RunConfig
from .errors import DistilleryError

# GGUF value types -> struct format (scalars); 8 = string, 9 = array
_GGUF_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


@dataclass
class ModelShape:
    """A model's config and sizes. ``params``: unique parameters (tied embeddings once);
    ``matmul_params``: those that take part in a matmul per token (all but a separate input embedding)."""

    config: Any
    params: int
    matmul_params: int
    source: str

    @property
    def hidden(self) -> int:
        return int(self.config.hidden_size)

    @property
    def layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def ffn(self) -> int:
        return int(getattr(self.config, "intermediate_size", 4 * self.hidden))

    @property
    def kv_dim(self) -> int:
        heads = int(self.config.num_attention_heads)
        head_dim = getattr(self.config, "head_dim", None) or self.hidden // heads
        return int(getattr(self.config, "num_key_value_heads", heads) or heads) * int(head_dim)

    @property
    def vocab(self) -> int:
        return int(self.config.vocab_size)


def read_gguf_header(path: Path) -> tuple[dict, dict, list[str]]:
    """``(scalars, array_lengths, tensor_names)`` of a GGUF file, reading only its header."""
    def read(fh, fmt):
        size = struct.calcsize(fmt)
        data = fh.read(size)
        if len(data) != size:
            raise DistilleryError(f"{path}: truncated GGUF header")
        return struct.unpack(fmt, data)[0]

    def string(fh):
        return fh.read(read(fh, "<Q")).decode("utf-8", "replace")

    def skip(fh, vtype):
        if vtype == 8:
            fh.seek(read(fh, "<Q"), 1)
        elif vtype in _GGUF_SCALAR:
            fh.seek(struct.calcsize(_GGUF_SCALAR[vtype]), 1)
        else:
            raise DistilleryError(f"{path}: unknown GGUF value type {vtype}")

    scalars, arrays, names = {}, {}, []
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise DistilleryError(f"{path}: not a GGUF file (bad magic)")
        version = read(fh, "<I")
        if version < 2:
            raise DistilleryError(f"{path}: GGUF version {version} is too old")
        n_tensors, n_kv = read(fh, "<Q"), read(fh, "<Q")
        for _ in range(n_kv):
            key, vtype = string(fh), read(fh, "<I")
            if vtype == 9:
                etype, count = read(fh, "<I"), read(fh, "<Q")
                arrays[key] = count
                if etype == 8:
                    for _ in range(count):
                        skip(fh, 8)
                else:
                    fh.seek(count * struct.calcsize(_GGUF_SCALAR[etype]), 1)
            elif vtype == 8:
                scalars[key] = string(fh)
            else:
                scalars[key] = read(fh, _GGUF_SCALAR[vtype])
        for _ in range(n_tensors):
            names.append(string(fh))
            fh.seek(8 * read(fh, "<I") + 4 + 8, 1)  # dims, type, offset
    return scalars, arrays, names


def gguf_config(path: Path):
    """A Llama/Qwen2 HF config from a GGUF header (what transformers would build, without the tensors)."""
    from transformers import AutoConfig

    kv, arrays, names = read_gguf_header(path)
    arch = kv.get("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise DistilleryError(f"{path}: plan reads llama and qwen2 GGUF files, this one is '{arch}'")
    g = lambda key, default=None: kv.get(f"{arch}.{key}", default)  # noqa: E731
    fields = dict(hidden_size=g("embedding_length"), num_hidden_layers=g("block_count"),
                  intermediate_size=g("feed_forward_length"), num_attention_heads=g("attention.head_count"),
                  num_key_value_heads=g("attention.head_count_kv", g("attention.head_count")),
                  max_position_embeddings=g("context_length", 2048), rope_theta=g("rope.freq_base", 10000.0),
                  vocab_size=g("vocab_size", arrays.get("tokenizer.ggml.tokens")),
                  tie_word_embeddings="output.weight" not in names,
                  bos_token_id=kv.get("tokenizer.ggml.bos_token_id"), eos_token_id=kv.get("tokenizer.ggml.eos_token_id"))
    if None in (fields["hidden_size"], fields["num_hidden_layers"], fields["vocab_size"]):
        raise DistilleryError(f"{path}: the GGUF header lacks the model's sizes")
    return AutoConfig.for_model(arch, **fields)


def teacher_config(cfg: RunConfig):
    """The live teacher's HF config (no weights); None for a teacher cache."""
    from transformers import AutoConfig

    from .hashing import file_sha256
    from .teachers.hf import distillery_home, smollm2_gguf

    tc = cfg.teacher
    if tc.kind == "cache":
        return None
    path = smollm2_gguf() if tc.source == "smollm2" else Path(tc.source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise DistilleryError(f"teacher file '{tc.source}' does not exist")
        converted = distillery_home() / "teachers" / f"{path.stem}-{file_sha256(path)[:16]}"
        if (converted / "config.json").is_file():
            return AutoConfig.from_pretrained(converted)
        return gguf_config(path)
    if path.is_dir() and not (path / "config.json").is_file():
        raise DistilleryError(f"teacher folder '{tc.source}' has no config.json")
    try:
        return AutoConfig.from_pretrained(str(path) if path.is_dir() else tc.source,
                                          trust_remote_code=tc.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise DistilleryError(f"cannot read the config of teacher '{tc.source}': {str(exc).splitlines()[0]}") from None


def _cache_stand_in(cfg: RunConfig):
    from .teachers import open_teacher, teacher_config

    cached = open_teacher(cfg.teacher)
    return teacher_config(cfg.teacher, cached).config, cached


def student_config(cfg: RunConfig, teacher_cfg):
    """The student's HF config as ``build_student`` would make it (pruned: the teacher's, cut down)."""
    from transformers import AutoConfig

    from .students import student_config as from_fields

    s = cfg.student
    if s.init == "pretrained":
        if not s.pretrained or not (Path(s.pretrained) / "config.json").is_file():
            raise DistilleryError(f"student.pretrained '{s.pretrained}' is not a model folder (no config.json)")
        return AutoConfig.from_pretrained(s.pretrained)
    if s.init == "pruned":
        if teacher_cfg is None:
            raise DistilleryError("student.init 'pruned' needs a live teacher (teacher.kind: hf)")
        c = teacher_cfg.__class__.from_dict(teacher_cfg.to_dict())
        for field, value in (("num_hidden_layers", s.prune.layers), ("hidden_size", s.prune.hidden),
                             ("intermediate_size", s.prune.ffn), ("num_attention_heads", s.prune.heads)):
            if value is not None:
                setattr(c, field, value)
        return c
    return from_fields(s.model, teacher_cfg)


def count_params(config) -> tuple[int, int]:
    """``(unique parameters, matmul parameters)`` of ``config``'s model, built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return total, total - (0 if emb is head else emb.numel())


def model_shapes(cfg: RunConfig) -> tuple[ModelShape | None, ModelShape, Any]:
    """``(teacher or None for a cache, student, cache or None)``."""
    cache = None
    tcfg = teacher_config(cfg)
    base = tcfg
    if cfg.teacher.kind == "cache":
        base, cache = _cache_stand_in(cfg)
    scfg = student_config(cfg, base)
    teacher = None if tcfg is None else ModelShape(tcfg, *count_params(tcfg), cfg.teacher.source)
    return teacher, ModelShape(scfg, *count_params(scfg), cfg.student.init), cache


def device_memory_bytes(device: str) -> tuple[int, str]:
    """``(bytes, what)``: a GPU's total memory, or the RAM available now (``MemAvailable``)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        dev = torch.device(device)
        props = torch.cuda.get_device_properties(dev.index or 0)
        return int(props.total_memory), f"{props.name} memory"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "available RAM"
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical RAM"


def probe_tflops(device: str, dtype: torch.dtype = torch.float32, seconds: float = 0.6, bursts: int = 3) -> float:
    """Dense matmul throughput of ``device`` in TFLOP/s: the best of ``bursts`` runs of square matmuls
    (about ``seconds`` in all; the best, because other load on a shared machine only slows a burst)."""
    n = 4096 if device.startswith("cuda") else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b  # warm-up
    sync()
    best = 0.0
    for _ in range(bursts):
        reps, t0 = 0, time.perf_counter()
        while True:
            a @ b
            reps += 1
            sync()
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds / bursts:
                break
        best = max(best, 2 * n ** 3 * reps / elapsed / 1e12)
    return best
