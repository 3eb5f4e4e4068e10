"""Everything a run needs before its first step: teacher, tokenizer, data, student, vocabulary check.

Kept apart from ``train.py`` so the loop stays readable, and shared by ``distill``, ``eval`` and the
demo. The order matters: the tokenizer comes from the teacher (or its cache), the data are tokenized
with it, and the student is checked against it before any compute is spent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

from .config import RunConfig
from .errors import DistilleryError
from .students import build_student, check_vocab, load_student_tokenizer
from .teachers import load_teacher


@dataclass
class Run:
    cfg: RunConfig
    teacher: Any              # has .targets(batch, vocab_size) -> TeacherTargets
    eval_teacher: Any | None  # a teacher for validation metrics (live, or the cache's validation split)
    tokenizer: Any
    train: Any
    val: Any | None
    fingerprint: dict
    student: torch.nn.Module
    vocab_size: int
    save_student: Callable[[torch.nn.Module, Path], None]
    teacher_stats: dict | None = None  # what the api_logprobs teacher found in the data (run summary)


def _max_positions(*models) -> int | None:
    limits = [getattr(m.config, "max_position_embeddings", None) for m in models if m is not None]
    limits = [x for x in limits if x]
    return min(limits) if limits else None


def _cached_teacher_basics(tcfg, tokenizer, width: int) -> SimpleNamespace:
    """A stand-in teacher (``.config`` only) for a student built next to a teacher cache.

    Without it a student built from ``student.model`` would take its family's defaults, e.g. Llama's
    32,000-entry vocabulary, whatever the cache's tokenizer. The teacher's own config is read (no
    weights) when ``teacher.source`` is set to a local model folder; otherwise the student inherits what
    the cache knows: its vocabulary width and the tokenizer's special-token ids.
    """
    from transformers import AutoConfig

    folder = Path(tcfg.source).expanduser()
    if "source" in tcfg.model_fields_set and (folder / "config.json").is_file():
        try:
            config = AutoConfig.from_pretrained(folder, trust_remote_code=tcfg.trust_remote_code)
        except (OSError, ValueError) as exc:
            from .teachers.hf import remote_code_error

            raise remote_code_error(exc, f"teacher '{tcfg.source}'", "teacher.trust_remote_code") from None
    else:
        config = AutoConfig.for_model("llama", vocab_size=width, eos_token_id=tokenizer.eos_token_id,
                                      bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    return SimpleNamespace(config=config)


def _check_student_size(cfg: RunConfig, teacher_model) -> None:
    """Refuse a student larger than its teacher before allocating it: sizes left out of ``student.model``
    take the family's defaults (Llama: d=4096, 32 layers, ~6.7B parameters), which ends in an out-of-memory
    kill, not an error. Counted on the meta device (no memory)."""
    from .plan_models import count_params
    from .students import student_config

    n_student = count_params(student_config(cfg.student.model, teacher_model.config))[0]
    n_teacher = sum(p.numel() for p in teacher_model.parameters())
    if n_student > n_teacher:
        raise DistilleryError(
            f"student.model builds a {n_student / 1e6:,.1f}M-parameter student, larger than the teacher "
            f"({n_teacher / 1e6:,.1f}M): set hidden_size, intermediate_size and num_hidden_layers (fields left "
            "out take the model family's defaults)")


def prepare_run(cfg: RunConfig, device: torch.device, is_main: bool = True) -> Run:
    from .data import build_datasets  # imported here: data pulls in tokenizers machinery

    tcfg = cfg.teacher
    gc = cfg.generation
    if tcfg.kind in ("cache", "api_logprobs") and gc.on_policy_fraction > 0:
        raise DistilleryError("generation.on_policy_fraction > 0 needs a live teacher to score the student's samples; "
                              f"teacher.kind '{tcfg.kind}' only holds targets for stored text (use teacher.kind: hf)")
    if gc.on_policy_fraction > 0 and gc.on_policy_start >= cfg.train.max_steps:
        raise DistilleryError(f"generation.on_policy_start ({gc.on_policy_start}) is not below train.max_steps "
                              f"({cfg.train.max_steps}): no step would be on-policy; lower it, or set "
                              "generation.on_policy_fraction to 0 for supervised KD")
    if tcfg.kind == "api_logprobs":
        return _prepare_api_run(cfg, device, is_main)
    if tcfg.kind == "cache":
        from .cache.teacher import CachedTeacher  # the teacher cache backend

        if not tcfg.cache_path:
            raise DistilleryError("teacher.kind is 'cache' but teacher.cache_path is not set")
        teacher = CachedTeacher(tcfg.cache_path)
        tokenizer = teacher.tokenizer
        teacher_model = None
        teacher_width = teacher.vocab_width
    else:
        teacher = load_teacher(tcfg.source, device=tcfg.device if tcfg.device != "auto" else str(device),
                               dtype=tcfg.dtype, trust_remote_code=tcfg.trust_remote_code)
        tokenizer = teacher.tokenizer
        teacher_model = teacher.model
        teacher_width = teacher_model.get_output_embeddings().weight.shape[0]

    splits = build_datasets(cfg.data, tokenizer, max_positions=_max_positions(teacher_model))
    if tcfg.kind == "cache":
        teacher.check(splits.fingerprint, cfg)

    calib = None
    if cfg.student.init == "pruned":
        from .train import collate

        n = min(len(splits.train), cfg.student.prune.calibration_batches * cfg.train.micro_batch_size)
        calib = [collate(splits.train, torch.arange(i, min(i + cfg.train.micro_batch_size, n)))
                 for i in range(0, n, cfg.train.micro_batch_size)]
    base = teacher_model
    if base is None and cfg.student.init == "config":
        base = _cached_teacher_basics(tcfg, tokenizer, teacher_width)
    if cfg.student.init == "config" and teacher_model is not None:
        _check_student_size(cfg, teacher_model)
    student = build_student(cfg.student, base, calibration=calib, seed=cfg.train.seed)
    limit = getattr(student.config, "max_position_embeddings", None)
    if limit and cfg.data.seq_len > limit:
        raise DistilleryError(f"data.seq_len ({cfg.data.seq_len}) is above the student's limit "
                              f"max_position_embeddings={limit}")
    student_tok = load_student_tokenizer(cfg.student, tokenizer)
    vocab = check_vocab(tokenizer, student_tok, teacher_width, student.get_output_embeddings().weight.shape[0])
    student.to(device)
    eval_teacher = teacher if tcfg.kind != "cache" else teacher.eval_teacher()
    return Run(cfg=cfg, teacher=teacher, eval_teacher=eval_teacher, tokenizer=tokenizer, train=splits.train,
               val=splits.val, fingerprint=splits.fingerprint, student=student, vocab_size=vocab,
               save_student=_student_saver(tokenizer))


def _prepare_api_run(cfg: RunConfig, device: torch.device, is_main: bool) -> Run:
    """``teacher.kind: api_logprobs``: the generated data set with its stored top_logprobs (no teacher model).

    The data are tokenized with the student's tokenizer; when the server's tokens are not ids of it (or no
    record has log-probabilities) the run says so in one line and trains on the text alone: the loss
    becomes cross-entropy (``kd_weight`` 0, ``ce_weight`` as set or 1) in the returned ``Run.cfg``.
    """
    import sys

    from .api.logprob_teacher import ApiLogprobTeacher, load_api_tokenizer
    from .data import build_datasets

    tcfg = cfg.teacher
    tokenizer, mismatch = load_api_tokenizer(cfg)
    teacher = ApiLogprobTeacher(tokenizer, list(cfg.data.train) + list(cfg.data.validation), cfg.data.format,
                                cfg.data.text_field, tokenizer_mismatch=mismatch)
    if is_main:
        teacher.report(sys.stderr)
    if teacher.uses_kd and cfg.loss.loss_temperature != 1.0:
        raise DistilleryError(f"loss.loss_temperature is {cfg.loss.loss_temperature}, but servers report log-probabilities "
                              "of the unscaled distribution: use loss.loss_temperature: 1.0 with teacher.kind api_logprobs")
    if not teacher.uses_kd and cfg.loss.kd_weight > 0:
        cfg = cfg.model_copy(deep=True)
        cfg.loss.ce_weight = cfg.loss.ce_weight if cfg.loss.ce_weight > 0 else 1.0
        cfg.loss.kd_weight = 0.0
    splits = build_datasets(cfg.data, tokenizer, chat_renderer=teacher.renderer)
    base = None
    if cfg.student.init == "config":
        base = _cached_teacher_basics(tcfg, tokenizer, len(tokenizer))
    student = build_student(cfg.student, base, seed=cfg.train.seed)
    limit = getattr(student.config, "max_position_embeddings", None)
    if limit and cfg.data.seq_len > limit:
        raise DistilleryError(f"data.seq_len ({cfg.data.seq_len}) is above the student's limit "
                              f"max_position_embeddings={limit}")
    vocab = check_vocab(tokenizer, tokenizer, len(tokenizer), student.get_output_embeddings().weight.shape[0])
    student.to(device)
    return Run(cfg=cfg, teacher=teacher, eval_teacher=teacher, tokenizer=tokenizer, train=splits.train,
               val=splits.val, fingerprint=splits.fingerprint, student=student, vocab_size=vocab,
               save_student=_student_saver(tokenizer), teacher_stats=teacher.stats.as_dict())


def _student_saver(tokenizer) -> Callable[[torch.nn.Module, Path], None]:
    def save_student(model: torch.nn.Module, folder: Path) -> None:
        """Plain HF folder (safetensors + tokenizer + generation config): no distillery needed to load it."""
        from .checkpoint import atomic_folder

        folder = Path(folder)
        with atomic_folder(folder, f"the student to {folder}") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)

    return save_student
