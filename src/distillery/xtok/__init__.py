"""Cross-tokenizer distillation: a teacher and a student with different tokenizers and vocabularies.

Pure functions, no model or teacher backend inside (the train loop and the teacher backends call them):

* :mod:`.vocab_map` — ``build_vocab_map(teacher_tok, student_tok)``: the exact-string (byte-identical) id pairs, cached.
* :mod:`.align` — byte offsets of each token, ``align_spans`` (1↔1, 1↔n, n↔1, n↔m spans over the same bytes),
  ``block_alignment`` -> :class:`Alignment` ``(B, T_s)`` per student label position; ``align_text``.
* :mod:`.chat` — ``align_chat(messages, teacher_tok, student_tok)``: each side's own chat template, assistant text only.
* :mod:`.terms` — the row-wise divergences: exact-string KL with a tail bucket, ULD, GOLD's hybrid, span Bernoulli KL.
* :mod:`.losses` — ``xtok_loss(student, teacher_targets, alignment, vmap, …) -> (B, T_s)``, chunked, bounded memory.
* :mod:`.student_targets` — ``cached_to_student``: a teacher cache's top-k (teacher tokenization + byte offsets) moved
  onto any student's tokens; ``student_side_loss`` on the result.

See docs/cross_tokenizer.md.
"""

from .align import (END, INSIDE, KIND_NAMES, MERGED, NONE, ONE, START, Alignment, TextAlignment, align_spans,
                    align_text, block_alignment, byte_offsets, encode_with_offsets, stack_alignments)
from .chat import ChatAlignment, align_chat
from .losses import METHODS, StudentHead, map_sparse_rows, xtok_loss
from .student_targets import StudentSideTargets, cached_to_student, student_side_loss, student_side_targets
from .vocab_map import TokenBytes, VocabMap, build_vocab_map, map_from_spellings, token_bytes

__all__ = ["END", "INSIDE", "KIND_NAMES", "MERGED", "NONE", "ONE", "START", "Alignment", "TextAlignment", "align_spans",
           "align_text", "block_alignment", "byte_offsets", "encode_with_offsets", "stack_alignments",
           "ChatAlignment", "align_chat", "METHODS", "StudentHead", "map_sparse_rows", "xtok_loss",
           "StudentSideTargets", "cached_to_student", "student_side_loss", "student_side_targets",
           "TokenBytes", "VocabMap", "build_vocab_map", "map_from_spellings", "token_bytes"]
