"""Distillation losses: per-token divergences (dense or sparse teachers) and the fused chunked path.

See :mod:`.divergences` for the formulas and the sparse tail-bucket rule, :mod:`.chunked` for the
memory-bounded training loss.
"""

from .chunked import chunked_distill_loss, distill_loss_full
from .divergences import (KD_LOSSES, cross_entropy, divergence, divergence_from_logprobs, forward_kl, jsd, reduce,
                          reverse_kl, skew_forward_kl, skew_reverse_kl, teacher_student_logprobs, tvd)

__all__ = ["KD_LOSSES", "chunked_distill_loss", "cross_entropy", "distill_loss_full", "divergence",
           "divergence_from_logprobs", "forward_kl", "jsd", "reduce", "reverse_kl", "skew_forward_kl",
           "skew_reverse_kl", "teacher_student_logprobs", "tvd"]
