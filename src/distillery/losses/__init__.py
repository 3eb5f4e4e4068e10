"""Distillation losses: per-token divergences, the one ``reduce``, and the fused chunked objective.

Shapes: student logits ``(B, T, V)``; the teacher is raw logits ``(B, T, V)`` or a
:class:`~distillery.targets.TeacherTargets` (dense, lazy hidden + LM head, or sparse top-k + tail);
labels ``(B, T)`` already shifted, ``-100`` = no loss. Per-token functions return ``(B, T)`` in nats.

* :mod:`.divergences` — the formulas on log-probabilities (forward/reverse KL, generalized JSD in
  TRL's convention, DistiLLM's skew KLs, TVD), the reference for everything else.
* :mod:`.sparse` — what every divergence means for sparse targets: the (K+1)-bucket rule (top-k ids
  plus one tail bucket, on both sides), K = V equals dense, empty-tail floor; with a sampled tail,
  forward KL's unbiased estimate (the other divergences keep the bucket rule).
* :mod:`.per_token` — ``forward_kl(student_logits, teacher, …) -> (B, T)`` etc., ``cross_entropy``,
  ``reduce(per_token, mask, n_tokens)``, the ``divergence(name, …)`` dispatcher.
* :mod:`.chunked` — ``chunked_distill_loss``: LM head + KD + CE over target rows in chunks, gradients
  computed in the forward pass (:mod:`.kernels`); ``distill_loss_full``: the materialised reference.

**Temperature and τ².** ``loss_temperature`` τ softens both sides (``softmax(z / τ)``); the
per-token functions return the divergence itself, without any τ² factor. The training objective
(:func:`chunked_distill_loss`, :func:`distill_loss_full`) multiplies the KD term by τ² by default
(``kd_t2_scale=True``, Hinton et al. 2015: the gradient of a τ-softened KD term scales like 1/τ², so
τ² keeps it comparable across temperatures and against the CE term); pass ``kd_t2_scale=False`` for
the plain divergence. At τ = 1 the two agree. Sparse targets carry the τ they were recorded at;
asking for another raises :class:`~distillery.losses.inputs.LossInputError` (a ``ValueError``).

**Vocabulary.** When the teacher's and the student's widths differ (padded embeddings, e.g.
151,936 vs 152,064), pass ``vocab_size``: only the first ``vocab_size`` columns of both are used.
"""

from .chunked import chunked_distill_loss, distill_loss_full
from .divergences import NAMES as KD_LOSSES
from .inputs import LossInputError
from .per_token import (cross_entropy, divergence, forward_kl, jsd, reduce, reverse_kl, skew_forward_kl,
                        skew_reverse_kl, teacher_student_logprobs, tvd)

__all__ = ["KD_LOSSES", "LossInputError", "chunked_distill_loss", "cross_entropy", "distill_loss_full",
           "divergence", "forward_kl", "jsd", "reduce", "reverse_kl", "skew_forward_kl", "skew_reverse_kl",
           "teacher_student_logprobs", "tvd"]
