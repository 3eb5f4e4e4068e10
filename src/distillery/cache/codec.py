"""How one position's sparse teacher target is stored: the byte encoding of ids, log-probs and tail.

A position holds the teacher's top-``K`` token ids, their log-probabilities at ``loss_temperature``
(sorted, largest first) and ``tail_logprob = log(1 - sum_k exp(logprob_k))``. On disk:

* **ids**: ``uint16`` when the vocabulary has at most 65,536 entries, else ``uint32``. Exact.
* **log-probs**: one of

  - ``sqrt_u8`` (default) / ``sqrt_u16``: ``code = round(M * sqrt(min(-lp, L) / L))`` with
    ``M = 2**bits - 1`` and range ``L`` (default 32 nats); decoded ``lp = -L * (code / M)**2``.
    The square root spends the codes where the probability mass is: near ``lp = 0`` the step is
    tiny, at ``lp = -L`` it is ``2L/M``. The decoding error is at most
    ``L / (2M) * (2u + 1/(2M))`` with ``u = sqrt(min(-lp, L) / L)``; log-probs below ``-L``
    saturate at ``-L`` (a probability below ``e**-L``, 1.3e-14 for L = 32).
  - ``float16``: IEEE half precision (relative error <= 2**-11).

* **tail**: ``float16`` (log of the mass outside the top-K). An empty tail (the top-K hold all the
  mass, e.g. ``K = V``) is stored as ``-inf`` and decoded to ``-1e30``, the convention of
  :func:`distillery.targets.sparse_from_logits`.

A cache with a sampled tail (:mod:`.sampling`) also stores ``M`` drawn ids and their log-probs per
position, encoded exactly like the top-``K`` ones (same id type, same log-prob codes).

Bytes per position: ``(K + M) * (id_bytes + logprob_bytes) + 2``. Quantizing is monotone, so the stored
order (descending) survives decoding; ties may appear.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..errors import DistilleryError

LOGPROB_KINDS = ("sqrt_u8", "sqrt_u16", "float16")
EMPTY_TAIL = -1e30  # TeacherTargets' value for "no mass outside the top-k"
_NP = {"uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "float16": np.float16}


@dataclass(frozen=True)
class Encoding:
    """The byte encoding of a cache; recorded in its manifest under ``"encoding"``.

    Fields:
        ids: ``"uint16"`` or ``"uint32"``.
        logprobs: ``"sqrt_u8"``, ``"sqrt_u16"`` or ``"float16"``.
        logprob_range: ``L``: the most negative log-prob the ``sqrt_*`` codes represent.
        tail: always ``"float16"``.
    """

    ids: str = "uint16"
    logprobs: str = "sqrt_u8"
    logprob_range: float = 32.0
    tail: str = "float16"

    @staticmethod
    def choose(vocab_size: int, logprobs: str = "sqrt_u8", logprob_range: float = 32.0) -> "Encoding":
        """The encoding for a vocabulary: the smallest id type that holds every id."""
        if logprobs not in LOGPROB_KINDS:
            raise DistilleryError(f"cache log-prob encoding '{logprobs}' is not one of {', '.join(LOGPROB_KINDS)}")
        if not logprob_range > 0:
            raise DistilleryError(f"cache logprob_range must be > 0 (got {logprob_range})")
        ids = "uint16" if vocab_size <= 1 << 16 else "uint32"
        return Encoding(ids=ids, logprobs=logprobs, logprob_range=float(logprob_range))

    @staticmethod
    def from_json(d: dict) -> "Encoding":
        enc = Encoding(**d)
        if enc.ids not in ("uint16", "uint32") or enc.logprobs not in LOGPROB_KINDS or enc.tail != "float16":
            raise DistilleryError(f"unknown cache encoding {d}")
        return enc

    def to_json(self) -> dict:
        return asdict(self)

    # ------------------------------------------------------------------ sizes and dtypes
    @property
    def id_dtype(self) -> np.dtype:
        return np.dtype(_NP[self.ids])

    @property
    def logprob_dtype(self) -> np.dtype:
        return np.dtype({"sqrt_u8": np.uint8, "sqrt_u16": np.uint16, "float16": np.float16}[self.logprobs])

    def bytes_per_position(self, k: int, m: int = 0) -> int:
        """Payload bytes of one position (``k`` top + ``m`` sampled ids and log-probs, tail), without per-block columns."""
        return (k + m) * (self.id_dtype.itemsize + self.logprob_dtype.itemsize) + 2

    @property
    def _levels(self) -> int:
        return (1 << (8 * self.logprob_dtype.itemsize)) - 1

    # ------------------------------------------------------------------ log-probs
    def encode_logprobs(self, lp: np.ndarray) -> np.ndarray:
        """float32 log-probs (any shape) -> stored codes of the same shape."""
        if self.logprobs == "float16":
            return lp.astype(np.float16)
        u = np.sqrt(np.clip(-lp, 0.0, self.logprob_range) / self.logprob_range)
        return np.rint(u * self._levels).astype(self.logprob_dtype)

    def logprob_table(self) -> np.ndarray | None:
        """Decoding table ``code -> float32 log-prob`` for the ``sqrt_*`` kinds (None for float16)."""
        if self.logprobs == "float16":
            return None
        m = self._levels
        return (-self.logprob_range * (np.arange(m + 1, dtype=np.float64) / m) ** 2).astype(np.float32)

    def decode_logprobs(self, codes: np.ndarray, table: np.ndarray | None = None) -> np.ndarray:
        """Stored codes -> float32 log-probs (``table`` = a cached :meth:`logprob_table`)."""
        if self.logprobs == "float16":
            return codes.astype(np.float32)
        table = self.logprob_table() if table is None else table
        return table[codes]

    def max_logprob_error(self, lp: np.ndarray) -> np.ndarray:
        """Upper bound of ``|decode(encode(lp)) - lp|`` for ``lp >= -L`` (the documented bound)."""
        lp = np.asarray(lp, dtype=np.float64)
        if self.logprobs == "float16":
            return np.abs(lp) * 2.0 ** -11 + 2.0 ** -24
        m = self._levels
        u = np.sqrt(np.clip(-lp, 0.0, self.logprob_range) / self.logprob_range)
        return self.logprob_range / (2 * m) * (2 * u + 1 / (2 * m)) + 1e-6

    # ------------------------------------------------------------------ tail
    @staticmethod
    def encode_tail(tail: np.ndarray) -> np.ndarray:
        t = tail.astype(np.float32)
        t = np.where(t <= EMPTY_TAIL / 2, -np.inf, t)
        return t.astype(np.float16)

    @staticmethod
    def decode_tail(codes: np.ndarray) -> np.ndarray:
        t = codes.astype(np.float32)
        return np.where(np.isneginf(t), np.float32(EMPTY_TAIL), t)


def to_sparse(out, k: int, loss_temperature: float, vocab_size: int | None, rows_per_chunk: int = 512, *,
              tail_samples: int = 0, uniforms: torch.Tensor | None = None, rows: np.ndarray | None = None):
    """A teacher's output for a batch -> ``(ids (B,T,K) int64, logprobs (B,T,K) f32, tail (B,T) f32,
    sample_ids (B,T,M) int64 | None, sample_logprobs (B,T,M) f32 | None)``.

    ``out`` is a logits tensor ``(B, T, V)`` or a :class:`~distillery.targets.TeacherTargets` (dense,
    lazy dense or sparse). Dense forms go through :func:`~distillery.targets.sparse_from_logits`
    ``rows_per_chunk`` positions at a time, so ``(B, T, V)`` log-probs are never all held at once.
    A sparse input must be at ``loss_temperature`` and hold at least ``k`` entries.

    ``tail_samples = M > 0`` also draws a sampled tail with ``uniforms (B, T, M)``
    (:func:`distillery.cache.sampling.tail_uniforms`). That needs the teacher's whole distribution,
    so a sparse input is accepted only if it already carries exactly ``M`` draws and exactly ``k``
    top entries (it is passed through as it is).

    ``rows (B, T)`` bool, when given, marks the positions the caller keeps (the cache's target positions): a dense
    input goes through the LM head, the softmax and the draws on those rows only; the other rows come back as zeros
    (ids 0, log-probs 0, tail 0), which the cache never stores.
    In chat data most positions are the prompt's: the head and the sampling were ~35 % of the teacher's time a
    row on a 2-core CPU (SmolLM2-135M), paid for nothing there.
    """
    from ..targets import TeacherTargets, sparse_from_logits, tail_logprob_outside

    if isinstance(out, torch.Tensor):
        out = TeacherTargets(logits=out)
    if not isinstance(out, TeacherTargets):
        raise DistilleryError(f"the teacher returned {type(out).__name__}; expected logits or TeacherTargets")
    b, t = out.shape
    if out.is_sparse:
        if out.loss_temperature is None or abs(out.loss_temperature - loss_temperature) > 1e-9:
            raise DistilleryError(f"the teacher's sparse targets are at loss_temperature={out.loss_temperature}, "
                                  f"the cache asks {loss_temperature}")
        if out.width < k:
            raise DistilleryError(f"the teacher gives top-{out.width} targets, fewer than the cache's k={k}")
        if tail_samples and (out.n_samples != tail_samples or out.width != k):
            raise DistilleryError(f"a sampled tail (m={tail_samples}) needs the teacher's full distribution (dense "
                                  f"logits); this teacher gives top-{out.width} sparse targets with "
                                  f"{out.n_samples} draws")
        lp, order = out.topk_logprobs.float().topk(k, dim=-1)  # (B, T, K), sorted
        ids = out.topk_ids.gather(-1, order).long()
        ids, lp = ids.cpu(), lp.cpu()
        if tail_samples:
            return ids, lp, out.tail_logprob.float().cpu(), out.sample_ids.long().cpu(), out.sample_logprobs.float().cpu()
        if out.width == k:
            return ids, lp, out.tail_logprob.float().cpu(), None, None
        return ids, lp, tail_logprob_outside(lp), None, None  # the tail of the k kept entries
    if tail_samples and (uniforms is None or tuple(uniforms.shape) != (b, t, tail_samples)):
        raise DistilleryError(f"a sampled tail of m={tail_samples} needs uniforms of shape {(b, t, tail_samples)}")
    flat_u = None if not tail_samples else uniforms.reshape(b * t, tail_samples)
    keep = None  # the kept rows (flattened), when the caller names them
    if rows is not None:
        keep = torch.from_numpy(np.flatnonzero(np.asarray(rows).reshape(-1)))
        if not len(keep):  # no target in the batch: one row anyway, for the shapes (ignored like every other)
            keep = torch.zeros(1, dtype=torch.long)
    n_rows = b * t if keep is None else len(keep)
    on = (out.logits if out.logits is not None else out.hidden).device
    ids, lps, tails, s_ids, s_lps = [], [], [], [], []
    for start in range(0, n_rows, rows_per_chunk):
        part = slice(start, start + rows_per_chunk) if keep is None else keep[start:start + rows_per_chunk]
        logits = out.dense_logits(part if keep is None else part.to(on))  # (n, V)
        u = None if flat_u is None else flat_u[part][None]
        sp = sparse_from_logits(logits[None], k, loss_temperature, vocab_size=vocab_size,
                                tail_samples=tail_samples, uniforms=u)
        ids.append(sp.topk_ids[0].cpu())  # the teacher may run on a GPU; the cache is written from host memory
        lps.append(sp.topk_logprobs[0].cpu())
        tails.append(sp.tail_logprob[0].cpu())
        if sp.n_samples:
            s_ids.append(sp.sample_ids[0].cpu())
            s_lps.append(sp.sample_logprobs[0].cpu())
    if keep is not None:  # scatter the target rows into zero-filled (B*T, ...) tensors
        def full(parts: list[torch.Tensor]) -> list[torch.Tensor]:
            kept = torch.cat(parts)
            z = torch.zeros((b * t, *kept.shape[1:]), dtype=kept.dtype)
            z[keep] = kept
            return [z]

        ids, lps, tails = full(ids), full(lps), full(tails)
        if s_ids:
            s_ids, s_lps = full(s_ids), full(s_lps)
    kk = ids[0].shape[-1]
    sampled = (torch.cat(s_ids).view(b, t, -1), torch.cat(s_lps).view(b, t, -1)) if s_ids else (None, None)
    return (torch.cat(ids).view(b, t, kk), torch.cat(lps).view(b, t, kk), torch.cat(tails).view(b, t), *sampled)
