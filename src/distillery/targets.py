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

``mask (B, T)`` (bool), when given, marks the positions that carry a target; it normally equals
``labels != -100``.
"""

from __future__ import annotations

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

    # ------------------------------------------------------------------ shape helpers
    @property
    def is_sparse(self) -> bool:
        return self.topk_ids is not None

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
        """Vocabulary width of the dense form (``V_t``), or ``K`` for the sparse form."""
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

    def to(self, device: torch.device | str) -> "TeacherTargets":
        """Move every tensor to ``device`` (non-blocking where possible)."""
        kw = {}
        for name in ("logits", "hidden", "lm_head_weight", "lm_head_bias", "topk_ids", "topk_logprobs",
                     "tail_logprob", "mask"):
            t = getattr(self, name)
            kw[name] = None if t is None else t.to(device, non_blocking=True)
        return TeacherTargets(**kw, loss_temperature=self.loss_temperature, vocab_size=self.vocab_size)


def sparse_from_logits(logits: torch.Tensor, k: int, loss_temperature: float,
                       vocab_size: int | None = None, mask: torch.Tensor | None = None) -> TeacherTargets:
    """Reduce dense logits ``(B, T, V)`` to the sparse top-k + tail form at ``loss_temperature``.

    ``logprobs = log_softmax(logits[..., :vocab_size] / T)``; keep the ``k`` largest; the tail is
    ``log(1 - sum(exp(top-k)))`` clamped at the smallest normal float32 so it stays finite.
    With ``k == vocab_size`` the tail is (numerically) empty and the sparse losses equal the dense ones.
    """
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    logits = logits if logits.dtype == torch.float64 else logits.float()
    logprobs = torch.log_softmax(logits / loss_temperature, dim=-1)  # (B, T, V)
    k = min(k, logprobs.shape[-1])
    top_lp, top_ids = logprobs.topk(k, dim=-1)  # (B, T, K)
    kept = top_lp.exp().sum(-1)  # (B, T)
    tail = torch.log1p(-kept.clamp(max=1.0)).clamp(min=torch.finfo(torch.float32).min / 2)
    tail = torch.where(kept >= 1.0, torch.full_like(tail, -1e30), tail)
    return TeacherTargets(topk_ids=top_ids, topk_logprobs=top_lp, tail_logprob=tail,
                          loss_temperature=loss_temperature, mask=mask, vocab_size=vocab_size)
