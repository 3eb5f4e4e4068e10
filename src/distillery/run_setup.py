"""Everything a run needs before its first step: teacher, tokenizer, data, student, vocabulary check.

Kept apart from ``train.py`` so the loop stays readable, and shared by ``distill``, ``eval`` and the
demo. The order matters: the tokenizer comes from the teacher (or its cache), the data are tokenized
with it, and the student is checked against it before any compute is spent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .config import RunConfig
from .errors import DistilleryError
from .students import build_student, check_student_family, check_vocab, load_student_tokenizer
from .teachers import Teacher, open_teacher, shared_vocab, teacher_config, teacher_device


@dataclass
class Run:
    cfg: RunConfig
    teacher: Teacher
    eval_teacher: Teacher | None  # the teacher for validation metrics (live, or the cache's validation split)
    tokenizer: object
    train: object  # data.BlockDataset (xtok.cached.StudentBlocks: a cache serving another student tokenizer)
    val: object | None
    fingerprint: dict
    student: torch.nn.Module
    vocab_size: int
    save_student: Callable[[torch.nn.Module, Path], None]
    teacher_stats: dict | None = None  # what the api_logprobs teacher found in the data (run summary)
    xtok: object | None = None  # xtok.batch.CrossTokenizer when the student has its own tokenizer
    teacher_vocab: int | None = None  # the teacher's vocabulary (differs from vocab_size across tokenizers)


def _max_positions(*models) -> int | None:
    limits = [getattr(m.config, "max_position_embeddings", None) for m in models if m is not None]
    limits = [x for x in limits if x]
    return min(limits) if limits else None


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


def _check_recipe(cfg: RunConfig) -> None:
    """Checks on the recipe alone, before anything loads."""
    check_student_family(cfg.student)  # a family the loss or the exporters cannot handle, from config.json alone
    gc = cfg.generation
    if gc.on_policy_fraction > 0 and gc.on_policy_start >= cfg.train.max_steps:
        raise DistilleryError(f"generation.on_policy_start ({gc.on_policy_start}) is not below train.max_steps "
                              f"({cfg.train.max_steps}): no step would be on-policy; lower it, or set "
                              "generation.on_policy_fraction to 0 for supervised KD")
    if cfg.student.init == "pruned" and cfg.teacher.kind != "hf":
        raise DistilleryError(f"student.init 'pruned' cuts the student out of the teacher's weights: it needs "
                              f"teacher.kind 'hf' (the teacher in this process), not '{cfg.teacher.kind}'")


def prepare_run(cfg: RunConfig, device: torch.device, is_main: bool = True) -> Run:
    """Teacher, data, student and vocabulary for ``distill`` (and the demo), in that order.

    The teacher comes from :func:`~distillery.teachers.open_teacher` whatever its kind; the data are
    tokenized with its tokenizer, or with the student's own when it has another (``student.tokenizer``, or a
    pretrained student's: then ``Run.xtok`` maps every batch to the teacher's tokens, docs/cross_tokenizer.md;
    a teacher cache keeps the teacher's blocks and the student re-tokenizes them, :mod:`distillery.xtok.cached`);
    the student is built beside it and checked against it (one vocabulary rule,
    :func:`~distillery.teachers.shared_vocab`; one device rule, :func:`~distillery.teachers.teacher_device`).
    """
    from .data import build_datasets  # imported here: data pulls in tokenizers machinery

    _check_recipe(cfg)
    tcfg = cfg.teacher
    teacher = open_teacher(tcfg, teacher_device(tcfg.device, device), data=cfg.data, student=cfg.student)
    if cfg.generation.on_policy_fraction > 0 and not teacher.scores_new_text:
        raise DistilleryError("generation.on_policy_fraction > 0 needs a teacher that scores the student's samples; "
                              f"teacher.kind '{tcfg.kind}' only holds targets for stored text (use teacher.kind: hf or served)")
    tokenizer = teacher.tokenizer
    student_tok = load_student_tokenizer(cfg.student, tokenizer)  # a pretrained student's own, else the teacher's
    if cfg.student.tokenizer:
        from .student_tokenizer import open_student_tokenizer

        student_tok = open_student_tokenizer(cfg.student.tokenizer, tokenizer, cfg.data, cfg.train.output_dir)
    xtok = None
    if student_tok.get_vocab() != tokenizer.get_vocab():  # another vocabulary: cross-tokenizer distillation
        cfg, xtok = _cross_tokenizer_setup(cfg, teacher, student_tok)
    teacher_stats, renderer = None, None
    if tcfg.kind == "api_logprobs":  # stored answers: say what is usable; without log-probs, the text alone (CE)
        cfg, renderer, teacher_stats = _api_logprobs_setup(cfg, teacher, is_main)

    data_tok = student_tok if xtok is not None else tokenizer  # the student trains on its own tokens
    # A cache is keyed by the teacher's blocks: the data are built with its tokenizer, and with another student
    # tokenizer each block is re-tokenized by the student on the fly (xtok.cached.StudentBlocks, below).
    cached_xtok = xtok is not None and tcfg.kind == "cache"
    if xtok is not None and not cached_xtok:  # conversations: each side in its own chat template (xtok.chat_data)
        from .xtok.chat_data import CrossChatRenderer

        renderer = CrossChatRenderer(tokenizer, student_tok)
    splits = build_datasets(cfg.data, tokenizer if cached_xtok else data_tok,
                            max_positions=_max_positions(teacher.model), chat_renderer=renderer)
    if xtok is not None and not cached_xtok and renderer.conversations:
        xtok.use_chat(renderer)
    if tcfg.kind == "cache":
        teacher.check(splits.fingerprint, cfg)

    calib = None
    if cfg.student.init == "pruned":
        mb = cfg.train.micro_batch_size
        n = min(len(splits.train), cfg.student.prune.calibration_batches * mb)
        calib = [splits.train.batch(torch.arange(i, min(i + mb, n))) for i in range(0, n, mb)]
        if xtok is not None:  # the teacher is pruned on its own tokens of the same text (the batch's teacher view)
            calib = [xtok.view(b).batch for b in calib]
    if cfg.student.init == "config" and teacher.model is not None:
        _check_student_size(cfg, teacher.model)
    # pruned with its own tokenizer: the pruned teacher's embedding is transplanted to the student's vocabulary
    transplant = {"student_tokenizer": student_tok, "teacher_tokenizer": tokenizer} if (
        xtok is not None and cfg.student.init == "pruned") else {}
    student = build_student(cfg.student, teacher_config(tcfg, teacher), calibration=calib, seed=cfg.train.seed,
                            **transplant)
    limit = getattr(student.config, "max_position_embeddings", None)
    if limit and cfg.data.seq_len > limit:
        raise DistilleryError(f"data.seq_len ({cfg.data.seq_len}) is above the student's limit "
                              f"max_position_embeddings={limit}")
    s_width = student.get_output_embeddings().weight.shape[0]
    if xtok is None:
        vocab = check_vocab(tokenizer, student_tok, teacher.vocab_width, s_width)
        teacher_vocab = vocab
    else:
        vocab = shared_vocab(student_tok, None, s_width)
        teacher_vocab = shared_vocab(tokenizer, teacher.vocab_width)
    student.to(device)
    train, val = splits.train, splits.val
    if cached_xtok:  # student batches of the teacher's blocks, each carrying its teacher view (xtok/cached.py)
        from .xtok.cached import StudentBlocks

        train = StudentBlocks(train, xtok, max_len=limit)
        val = StudentBlocks(val, xtok, max_len=limit) if val is not None else None
    return Run(cfg=cfg, teacher=teacher, eval_teacher=teacher.eval_teacher(), tokenizer=data_tok,
               train=train, val=val, fingerprint=splits.fingerprint, student=student,
               vocab_size=vocab, save_student=_student_saver(data_tok, cfg.student), teacher_stats=teacher_stats,
               xtok=xtok, teacher_vocab=teacher_vocab)


def _cross_tokenizer_setup(cfg: RunConfig, teacher, student_tok):
    """A student with its own vocabulary: refuse what cannot work, size a built student's embedding to its
    tokenizer (a pruned student's is transplanted in ``build_student``, :mod:`distillery.xtok.transplant`), and
    return the :class:`~distillery.xtok.batch.CrossTokenizer` that maps batches."""
    from .xtok.batch import CrossTokenizer

    if cfg.student.init == "pruned" and cfg.student.lora is not None:
        raise DistilleryError("student.lora with student.init 'pruned' and student.tokenizer: the transplanted embedding "
                              "(a token the teacher lacks starts as the mean of its pieces) would stay frozen under LoRA; "
                              "train the pruned student in full (drop student.lora), or keep the teacher's tokenizer")
    if cfg.teacher.kind == "api_logprobs":
        raise DistilleryError(f"a student with its own tokenizer needs a teacher that scores text in its own tokens: "
                              f"teacher.kind 'hf', 'served' or 'cache', not '{cfg.teacher.kind}' (docs/cross_tokenizer.md)")
    if cfg.student.init == "config":
        cfg = cfg.model_copy(deep=True)
        cfg.student.model = {**cfg.student.model, "vocab_size": len(student_tok),
                             **{k: getattr(student_tok, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}}
    return cfg, CrossTokenizer(teacher.tokenizer, student_tok)





def _api_logprobs_setup(cfg: RunConfig, teacher, is_main: bool):
    """``teacher.kind: api_logprobs``: report what the stored answers allow; when the server's tokens are not
    ids of the student's tokenizer (or no record has log-probabilities) train on the text alone: the loss
    becomes cross-entropy (``kd_weight`` 0, ``ce_weight`` as set or 1) in the returned config."""
    import sys

    if is_main:
        teacher.report(sys.stderr)
    if teacher.uses_kd and cfg.loss.loss_temperature != 1.0:
        raise DistilleryError(f"loss.loss_temperature is {cfg.loss.loss_temperature}, but servers report log-probabilities "
                              "of the unscaled distribution: use loss.loss_temperature: 1.0 with teacher.kind api_logprobs")
    if not teacher.uses_kd and cfg.loss.kd_weight > 0:
        cfg = cfg.model_copy(deep=True)
        cfg.loss.ce_weight = cfg.loss.ce_weight if cfg.loss.ce_weight > 0 else 1.0
        cfg.loss.kd_weight = 0.0
    return cfg, teacher.renderer, teacher.stats.as_dict()


def _student_saver(tokenizer, scfg=None) -> Callable[[torch.nn.Module, Path], None]:
    def save_student(model: torch.nn.Module, folder: Path) -> None:
        """Plain HF folder (safetensors + tokenizer + generation config): no distillery needed to load it.
        A LoRA student is saved merged, and its adapter alone beside the folder (``adapter/``)."""
        from .checkpoint import atomic_folder
        from .lora import plain_model, save_adapter

        folder = Path(folder)
        with atomic_folder(folder, f"the student to {folder}") as tmp:
            plain_model(model).save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        if scfg is not None and scfg.lora is not None:
            with atomic_folder(folder.parent / "adapter", "the LoRA adapter") as tmp:
                save_adapter(model, scfg.lora, tmp, scfg.pretrained)

    return save_student
