"""Checking what a loss is handed: the teacher's form, the shared vocabulary width, the temperature.

Both the per-token functions and the fused chunked loss resolve their arguments here, so they accept
and refuse exactly the same inputs. Every refusal is a :class:`LossInputError`: a ``ValueError``
(what a caller of a loss function expects) that is also a :class:`~distillery.errors.DistilleryError`
(so the CLI prints it as one line, e.g. for a cache recorded at another ``loss_temperature``).
"""

from __future__ import annotations

import math

import torch

from ..errors import DistilleryError
from ..targets import TeacherTargets


class LossInputError(DistilleryError, ValueError):
    """A loss was given inputs that do not fit together (widths, temperature, ids, weights)."""


def as_targets(teacher: TeacherTargets | torch.Tensor) -> TeacherTargets:
    """A raw logits tensor ``(B, T, V_t)`` becomes dense ``TeacherTargets``; targets pass through."""
    if isinstance(teacher, TeacherTargets):
        return teacher
    if isinstance(teacher, torch.Tensor):
        return TeacherTargets(logits=teacher)
    raise LossInputError(f"teacher must be a logits tensor or TeacherTargets, got {type(teacher).__name__}")


def vocab_width(student_width: int, teacher: TeacherTargets, vocab_size: int | None) -> int:
    """The number of leading vocabulary columns both sides are compared on.

    ``vocab_size`` (else ``teacher.vocab_size``) when given; otherwise the two widths must be equal.
    Padded vocabularies (e.g. 151,936 vs 152,064 rows) need ``vocab_size`` = the real tokenizer size:
    only the first ``vocab_size`` columns of *both* logits are used, the padding is ignored.
    """
    if vocab_size is not None and teacher.vocab_size is not None and vocab_size != teacher.vocab_size:
        raise LossInputError(f"vocab_size={vocab_size} disagrees with the teacher targets' vocab_size="
                             f"{teacher.vocab_size}")
    v = vocab_size if vocab_size is not None else teacher.vocab_size
    teacher_width = None if teacher.is_sparse else teacher.width
    if v is None:
        if teacher_width is not None and teacher_width != student_width:
            raise LossInputError(f"teacher logits have {teacher_width} vocabulary columns and the student's "
                                 f"{student_width}: pass vocab_size (the real tokenizer vocabulary size) to "
                                 f"compare only the shared leading columns")
        return student_width
    if v <= 0 or v > student_width or (teacher_width is not None and v > teacher_width):
        raise LossInputError(f"vocab_size={v} exceeds the logits' width (student {student_width}, "
                             f"teacher {teacher_width if teacher_width is not None else 'sparse'})")
    return v


def temperature(teacher: TeacherTargets, loss_temperature: float | None) -> float:
    """The temperature to soften both sides with.

    Dense targets take any ``loss_temperature`` (``None`` = 1). Sparse targets were computed at a
    fixed one (``teacher.loss_temperature``): ``None`` takes it, anything else must equal it.
    """
    if loss_temperature is not None and not loss_temperature > 0:
        raise LossInputError(f"loss_temperature must be > 0, got {loss_temperature}")
    if not teacher.is_sparse:
        return 1.0 if loss_temperature is None else float(loss_temperature)
    recorded = float(teacher.loss_temperature)
    if loss_temperature is not None and not math.isclose(loss_temperature, recorded, rel_tol=1e-6):
        raise LossInputError(f"sparse teacher targets were recorded at loss_temperature={recorded}; they cannot "
                             f"be used at loss_temperature={loss_temperature} (re-create them at that temperature, "
                             f"or set loss_temperature={recorded})")
    return recorded


def check_sparse_ids(ids: torch.Tensor, vocab: int, what: str = "top-k") -> None:
    """Sparse ids must index the compared vocabulary ``[0, vocab)``; K may not exceed it (top-k ids)."""
    if what == "top-k" and ids.shape[-1] > vocab:
        raise LossInputError(f"sparse targets keep K={ids.shape[-1]} ids but the vocabulary has only {vocab}")
    if ids.numel() and (int(ids.max()) >= vocab or int(ids.min()) < 0):
        raise LossInputError(f"sparse teacher {what} ids span [{int(ids.min())}, {int(ids.max())}], outside the "
                             f"vocabulary [0, {vocab}): pass the right vocab_size or rebuild the targets")


def combined_mask(mask: torch.Tensor | None, teacher: TeacherTargets) -> torch.Tensor | None:
    """Positions that carry a loss: ``mask`` and the teacher's own ``mask`` (both when both are given)."""
    if teacher.mask is None:
        return mask
    return teacher.mask.bool() if mask is None else (mask.bool() & teacher.mask.bool())


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp64 if any input is fp64, else fp32 (bf16/fp16 logits are upcast for the softmax maths)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
