"""`TeacherTargets`: the one form every teacher backend yields and every loss consumes.

Alignment convention (used everywhere in distillery): a batch carries ``input_ids (B, T)`` and
*already shifted* ``labels (B, T)``: ``labels[b, t]`` is the token that should follow
``input_ids[b, :t+1]``, or ``-100`` where no loss is taken (padding, prompt/user tokens, the end of a
block). The student's logits at position ``t`` and the teacher's target at position ``t`` both
describe the distribution of that next token, so they line up index for index: no shifting inside
losses.

A target is either

* **dense**: the teacher's raw logits over the whole vocabulary, ``(B, T, V_t)``, unscaled (the loss
  applies ``loss_temperature`` itself). To avoid materialising ``(B, T, V)`` for big vocabularies,
  a live teacher may instead hand over its final hidden states ``(B, T, H)`` and its LM head weight
  ``(V_t, H)``; :meth:`TeacherTargets.dense_logits` then computes logits only for the rows asked for.
* **sparse**: the teacher's top-k token ids ``(B, T, K)`` (int64) and their log-probabilities
  ``(B, T, K)`` (float32) *already computed at* ``loss_temperature`` (log-softmax of logits / T),
  plus ``tail_logprob (B, T)``: log of the probability mass outside the top-k,
  ``log(max(1 - sum_k exp(logprobs_k), tiny))``. This is what the teacher cache stores and what an
  API with ``top_logprobs`` returns. Its temperature is fixed when it is recorded; a loss asked for
  another temperature must refuse (see ``losses``).

  Optionally a sparse target also carries a **sampled tail**: ``sample_ids (B, T, M)`` drawn from the
  teacher's tail distribution (``p`` restricted to the ids *not* in ``topk_ids``, renormalised) and
  their log-probabilities ``sample_logprobs (B, T, M)`` at the same temperature. Each draw stands
  for ``exp(tail_logprob) / M`` of the mass, so forward KL gets an unbiased estimate of its tail term
  (:mod:`distillery.losses.sparse`); the other divergences ignore the draws and use the tail bucket.
  Draws may repeat. ``topk_ids`` stay the exact top-k, so everything that reads only
  ``topk_ids``/``topk_logprobs``/``tail_logprob`` (:meth:`TeacherTargets.sparse_rows`) sees the plain
  top-k + tail-bucket form.

``mask (B, T)`` (bool), when given, marks the positions that carry a target; it normally equals
``labels != -100``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class TeacherTargets:
    """Teacher signal for a batch, dense or sparse (exactly one of the three forms is set).

    Fields:
        logits: dense raw logits ``(B, T, V_t)``.
        hidden: final-layer hidden states ``(B, T, H)`` (post final norm), with ``lm_head_weight``
            ``(V_t, H)`` and optional ``lm_head_bias`` ``(V_t,)``: lazy dense form.
        topk_ids: sparse ids ``(B, T, K)`` int64.
        topk_logprobs: sparse log-probabilities at ``loss_temperature`` ``(B, T, K)`` float32.
        tail_logprob: log of the mass outside the top-k ``(B, T)`` float32.
        sample_ids: optional sampled tail ``(B, T, M)`` int64: draws from the teacher's distribution
            restricted to the ids outside ``topk_ids`` (renormalised); ``None`` = no sampled tail.
        sample_logprobs: the teacher's log-probabilities of ``sample_ids`` at ``loss_temperature``
            ``(B, T, M)`` float32 (set exactly when ``sample_ids`` is).
        loss_temperature: the temperature the sparse log-probabilities were computed at
            (``None`` for dense targets, which can be softened at any temperature).
        mask: positions that carry a target ``(B, T)`` bool, or ``None`` for all.
        vocab_size: the number of real (tokenizer) vocabulary entries; logits beyond it are
            embedding padding and are ignored by the losses. ``None`` = use the full width.
    """

    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    lm_head_weight: torch.Tensor | None = None
    lm_head_bias: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    tail_logprob: torch.Tensor | None = None
    sample_ids: torch.Tensor | None = None
    sample_logprobs: torch.Tensor | None = None
    loss_temperature: float | None = None
    mask: torch.Tensor | None = None
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        forms = [self.logits is not None, self.hidden is not None, self.topk_ids is not None]
        if sum(forms) != 1:
            raise ValueError("TeacherTargets needs exactly one of logits, hidden (+lm_head_weight) or topk_ids")
        if self.hidden is not None and self.lm_head_weight is None:
            raise ValueError("TeacherTargets(hidden=...) needs lm_head_weight")
        if self.topk_ids is not None:
            if self.topk_logprobs is None or self.tail_logprob is None:
                raise ValueError("sparse TeacherTargets needs topk_ids, topk_logprobs and tail_logprob")
            if self.topk_ids.shape != self.topk_logprobs.shape:
                raise ValueError(f"topk_ids {tuple(self.topk_ids.shape)} and topk_logprobs "
                                 f"{tuple(self.topk_logprobs.shape)} differ in shape")
            if self.loss_temperature is None:
                raise ValueError("sparse TeacherTargets must record the loss_temperature it was made at")
        if (self.sample_ids is None) != (self.sample_logprobs is None):
            raise ValueError("a sampled tail needs both sample_ids and sample_logprobs")
        if self.sample_ids is not None:
            if self.topk_ids is None:
                raise ValueError("sample_ids (a sampled tail) only go with the sparse form (topk_ids)")
            if self.sample_ids.shape != self.sample_logprobs.shape:
                raise ValueError(f"sample_ids {tuple(self.sample_ids.shape)} and sample_logprobs "
                                 f"{tuple(self.sample_logprobs.shape)} differ in shape")
            if self.sample_ids.shape[:-1] != self.topk_ids.shape[:-1]:
                raise ValueError(f"sample_ids {tuple(self.sample_ids.shape)} cover other positions than topk_ids "
                                 f"{tuple(self.topk_ids.shape)}")

    # ------------------------------------------------------------------ shape helpers
    @property
    def is_sparse(self) -> bool:
        return self.topk_ids is not None

    @property
    def n_samples(self) -> int:
        """``M``, the number of sampled-tail entries per position (0 = top-k + tail bucket only)."""
        return 0 if self.sample_ids is None else int(self.sample_ids.shape[-1])

    def without_samples(self) -> "TeacherTargets":
        """The same targets without the sampled tail: the top-k + one-tail-bucket form (shares tensors)."""
        return dataclasses.replace(self, sample_ids=None, sample_logprobs=None)

    @property
    def shape(self) -> tuple[int, int]:
        """``(B, T)`` of the positions these targets cover."""
        if self.logits is not None:
            return tuple(self.logits.shape[:2])  # type: ignore[return-value]
        if self.hidden is not None:
            return tuple(self.hidden.shape[:2])  # type: ignore[return-value]
        return tuple(self.topk_ids.shape[:2])  # type: ignore[union-attr,return-value]

    @property
    def width(self) -> int:
        """Vocabulary width of the dense form (``V_t``), or ``K`` (top-k entries, samples not counted) for the sparse form."""
        if self.logits is not None:
            return self.logits.shape[-1]
        if self.hidden is not None:
            return self.lm_head_weight.shape[0]  # type: ignore[union-attr]
        return self.topk_ids.shape[-1]  # type: ignore[union-attr]

    # ------------------------------------------------------------------ row access
    def dense_logits(self, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Dense teacher logits for selected flattened positions.

        ``rows`` indexes the flattened ``(B*T)`` positions (a LongTensor of row numbers, a slice,
        or ``None`` for all). Returns ``(n, V_t)`` logits (float32 unless the teacher ran in
        another dtype). With the lazy ``hidden`` form only the requested rows go through the LM
        head, so a chunked loss never holds the teacher's full ``(B, T, V)``.
        """
        if self.is_sparse:
            raise ValueError("dense_logits() called on sparse TeacherTargets")
        if self.logits is not None:
            flat = self.logits.reshape(-1, self.logits.shape[-1])  # (B*T, V)
            return flat if rows is None else flat[rows]
        flat_h = self.hidden.reshape(-1, self.hidden.shape[-1])  # type: ignore[union-attr]  (B*T, H)
        h = flat_h if rows is None else flat_h[rows]
        return torch.nn.functional.linear(h, self.lm_head_weight, self.lm_head_bias)  # (n, V)

    def sparse_rows(self, rows: torch.Tensor | slice | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sparse targets for selected flattened positions: ``(ids (n, K), logprobs (n, K), tail (n,))``."""
        if not self.is_sparse:
            raise ValueError("sparse_rows() called on dense TeacherTargets")
        k = self.topk_ids.shape[-1]  # type: ignore[union-attr]
        ids = self.topk_ids.reshape(-1, k)  # type: ignore[union-attr]
        lp = self.topk_logprobs.reshape(-1, k)  # type: ignore[union-attr]
        tail = self.tail_logprob.reshape(-1)  # type: ignore[union-attr]
        if rows is None:
            return ids, lp, tail
        return ids[rows], lp[rows], tail[rows]

    def sample_rows(self, rows: torch.Tensor | slice | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The sampled tail for selected flattened positions: ``(ids (n, M), logprobs (n, M))``, or None."""
        if self.sample_ids is None:
            return None
        m = self.sample_ids.shape[-1]
        ids, lp = self.sample_ids.reshape(-1, m), self.sample_logprobs.reshape(-1, m)  # type: ignore[union-attr]
        return (ids, lp) if rows is None else (ids[rows], lp[rows])

    def to(self, device: torch.device | str) -> "TeacherTargets":
        """Move every tensor to ``device`` (non-blocking where possible)."""
        kw = {}
        for name in ("logits", "hidden", "lm_head_weight", "lm_head_bias", "topk_ids", "topk_logprobs",
                     "tail_logprob", "sample_ids", "sample_logprobs", "mask"):
            t = getattr(self, name)
            kw[name] = None if t is None else t.to(device, non_blocking=True)
        return TeacherTargets(**kw, loss_temperature=self.loss_temperature, vocab_size=self.vocab_size)


def sample_tail(logprobs: torch.Tensor, top_ids: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Stratified draws from the teacher's tail: ``(n, V), (n, K), (n, M) -> ids (n, M)`` int64.

    The tail distribution is ``p_v / p_tail`` over the ids not in ``top_ids`` (``p = exp(logprobs)``).
    Draw ``j`` inverts its cumulative distribution, taken in vocabulary-id order, at
    ``u_j = (j + U_j) / M`` with ``U_j = uniforms[:, j]`` in ``[0, 1)``: one draw per equal-mass
    stratum. Every draw is then marginally a draw from stratum ``j`` and the stratified mean
    ``(1/M) Σ_j f(draw_j)`` is an unbiased estimate of ``E_tail[f]`` (and no noisier than ``M``
    independent draws). ``p`` is computed in the log-probs' dtype and its cdf summed in float64;
    the target ``u_j · p_tail`` is kept strictly below the summed ``p_tail``, so a draw never lands on
    a zero-probability id while the tail has mass. With an empty tail (no mass outside ``top_ids``)
    the draws are arbitrary ids; they carry weight ``p_tail = 0``.
    """
    cdf = logprobs.exp().double()  # (n, V)
    cdf.scatter_(-1, top_ids, 0.0)  # the tail distribution, unnormalised
    cdf.cumsum_(-1)  # (n, V)
    total = cdf[:, -1:]  # (n, 1) = p_tail as summed here
    m = uniforms.shape[-1]
    strata = torch.arange(m, dtype=torch.float64, device=uniforms.device)
    target = (strata + uniforms.double()) / m * total  # (n, M), in [0, p_tail)
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))  # < total despite rounding
    ids = torch.searchsorted(cdf, target, right=True)  # first id whose cdf exceeds the target
    return ids.clamp_(max=logprobs.shape[-1] - 1)


def tail_logprob_outside(top_logprobs: torch.Tensor) -> torch.Tensor:
    """``(…, K)`` kept log-probs -> ``(…)`` log of the mass outside them: ``log(1 - Σ exp)``, clamped at the
    smallest normal float32 so it stays finite, and ``-1e30`` where nothing is left (K covers the vocabulary)."""
    kept = top_logprobs.exp().sum(-1)
    tail = torch.log1p(-kept.clamp(max=1.0)).clamp(min=torch.finfo(torch.float32).min / 2)
    return torch.where(kept >= 1.0, torch.full_like(tail, -1e30), tail)


def sparse_from_logits(logits: torch.Tensor, k: int, loss_temperature: float,
                       vocab_size: int | None = None, mask: torch.Tensor | None = None, *,
                       tail_samples: int = 0, uniforms: torch.Tensor | None = None,
                       generator: torch.Generator | None = None) -> TeacherTargets:
    """Reduce dense logits ``(B, T, V)`` to the sparse top-k + tail form at ``loss_temperature``.

    ``logprobs = log_softmax(logits[..., :vocab_size] / T)``; keep the ``k`` largest; the tail is
    ``log(1 - sum(exp(top-k)))`` clamped at the smallest normal float32 so it stays finite.
    With ``k == vocab_size`` the tail is (numerically) empty and the sparse losses equal the dense ones.

    ``tail_samples = M > 0`` adds a sampled tail (:func:`sample_tail`, stratified, vocabulary-id
    order) with its log-probs; ``uniforms (B, T, M)`` in ``[0, 1)`` fix the draws (the cache derives
    them from a seed and the block/position, :mod:`distillery.cache.sampling`), else they come from
    ``torch.rand(generator=generator)``. No samples are drawn when ``k`` covers the vocabulary.
    """
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    logits = logits if logits.dtype == torch.float64 else logits.float()
    logprobs = torch.log_softmax(logits / loss_temperature, dim=-1)  # (B, T, V)
    k = min(k, logprobs.shape[-1])
    top_lp, top_ids = logprobs.topk(k, dim=-1)  # (B, T, K)
    tail = tail_logprob_outside(top_lp)  # (B, T)
    s_ids = s_lp = None
    if tail_samples > 0 and k < logprobs.shape[-1]:
        b, t, v = logprobs.shape
        if uniforms is None:
            uniforms = torch.rand(b, t, tail_samples, generator=generator, dtype=torch.float64)
        if uniforms.shape != (b, t, tail_samples):
            raise ValueError(f"uniforms {tuple(uniforms.shape)} should be {(b, t, tail_samples)}")
        uniforms = uniforms.to(logprobs.device)  # drawn or hashed on the host; the logits may be on a GPU
        flat_lp = logprobs.reshape(-1, v)
        flat_ids = sample_tail(flat_lp, top_ids.reshape(-1, k), uniforms.reshape(-1, tail_samples))  # (B*T, M)
        s_ids, s_lp = flat_ids.view(b, t, -1), flat_lp.gather(-1, flat_ids).view(b, t, -1)
    return TeacherTargets(topk_ids=top_ids, topk_logprobs=top_lp, tail_logprob=tail, sample_ids=s_ids,
                          sample_logprobs=s_lp, loss_temperature=loss_temperature, mask=mask, vocab_size=vocab_size)
