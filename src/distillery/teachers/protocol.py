"""The ``Teacher`` protocol: what every backend offers the rest of distillery, and the two shared rules.

A teacher is anything that turns a batch of token ids into :class:`~distillery.targets.TeacherTargets`.
The loop, the losses, ``eval`` and ``cache`` see only this protocol, never the backend:

=================  ==========================================================================================
backend            where the teacher lives
=================  ==========================================================================================
``hf``             in this process (a Hugging Face model: folder, hub id, ``.gguf``, ``smollm2``): lazy dense
``cache``          a teacher cache on disk (``distillery cache``): sparse top-k + tail, keyed by block
``api_logprobs``   the answers and stored ``top_logprobs`` of a ``distillery generate`` data set: sparse
``served``         an OpenAI-compatible server (vLLM, llama.cpp) scoring any token sequence: sparse
=================  ==========================================================================================

Two rules every verb applies through this module, so that ``distill``, ``eval``, ``cache``, ``prune``
and ``demo`` agree:

* **vocabulary** (:func:`shared_vocab`): the teacher's tokenizer defines the vocabulary; the teacher's
  and the student's distributions must both cover ``len(tokenizer)`` entries (wider, padded embedding
  tables are fine: the extra columns are ignored); fewer is an error, never a silent ``min``.
* **device** (:func:`teacher_device`): ``teacher.device: auto`` puts the teacher where the student
  runs; a named device keeps a big teacher elsewhere.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from ..errors import DistilleryError
from ..targets import TeacherTargets


class TeacherUnavailable(DistilleryError):
    """A remote teacher stopped answering (its retries spent): ``distill`` adds the checkpoint to resume from."""


@runtime_checkable
class Teacher(Protocol):
    """What a teacher backend provides (structural: no base class to inherit)."""

    name: str
    """Display name (reports, cache manifests)."""
    model: Any
    """The in-process ``PreTrainedModel``, or ``None`` when the teacher lives elsewhere (cache, server)."""
    scores_new_text: bool
    """Whether :meth:`targets` accepts token sequences it has never seen (the student's on-policy samples)."""

    @property
    def tokenizer(self) -> Any:
        """The tokenizer whose ids :meth:`targets` reads and returns."""

    @property
    def vocab_width(self) -> int:
        """Width of the teacher's distribution (its output embedding rows; may exceed ``len(tokenizer)``)."""

    def targets(self, batch: dict, vocab_size: int | None = None) -> TeacherTargets:
        """Teacher signal for ``batch`` (``input_ids (B, T)``, ``labels (B, T)``, ``attention_mask``,
        and ``index (B,)`` for keyed backends), aligned with the shifted labels."""

    def eval_teacher(self) -> "Teacher | None":
        """The teacher for validation batches (a cache binds its ``val`` split), or ``None`` if there is none."""

    def prefetch(self, batch: dict) -> None:
        """A hint that ``targets(batch)`` will be asked for soon (remote backends start the request)."""

    def identity(self) -> dict:
        """What identifies this teacher's distribution (a cache manifest records it; a cache checks it)."""


def shared_vocab(tokenizer, teacher_width: int, student_width: int | None = None) -> int:
    """The one vocabulary rule: ``len(tokenizer)`` entries, covered by the teacher's (and student's) outputs.

    Embedding tables may be padded past the tokenizer (151,936 vs 152,064 in Qwen2 checkpoints): the losses
    then use the first ``len(tokenizer)`` columns. A table narrower than the tokenizer cannot describe every
    token the data holds: a one-line error (TRL #2215, torchtune #2119), never a silent ``min``.
    """
    n = len(tokenizer)
    for who, width in (("teacher", teacher_width), ("student", student_width)):
        if width is not None and width < n:
            raise DistilleryError(f"{who} output layer has {width} logits but the tokenizer has {n} tokens")
    return n


def teacher_device(setting: str, student_device: torch.device | str) -> str:
    """The one device rule: ``'auto'`` = the student's device; anything else is taken as given (checked by
    :func:`~distillery.teachers.hf.pick_device`)."""
    return str(student_device) if setting == "auto" else setting


def run_device() -> torch.device:
    """Where this process trains or evaluates: its GPU (``LOCAL_RANK`` under a launcher) if any, else the CPU."""
    import os

    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")
