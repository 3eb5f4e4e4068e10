"""Embedding transplant: give a model (e.g. a student pruned from the teacher) another tokenizer's vocabulary.

A student pruned from the teacher keeps the teacher's embedding table ``(V_t, d)``. To train it with its own
tokenizer (``student.tokenizer``), each student id ``i`` gets a new row built from the teacher rows:

* **exact**: the teacher has the same token — the same raw string spelling the same bytes (``'Ġthe'`` in two
  byte-level BPEs, which share GPT-2's byte-to-unicode alphabet), else the teacher id that spells the same bytes
  (``'▁the'`` = ``'Ġthe'`` = ``b" the"``, :func:`~.vocab_map.token_bytes`): that row, copied;
* **special**: a student special token matched by content (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``);
  a special the teacher lacks (``<|pad|>``) gets the mean of all teacher rows;
* **split**: otherwise the mean of the teacher rows of the token's segmentation into teacher tokens:
  ``E_s[i] = (1/n) Σ_k E_t[t_k]``. The token's bytes are cut greedily by the longest prefix that is a teacher
  token's spelling; that always succeeds when the teacher's vocabulary holds every single byte (byte-level BPE, or
  SentencePiece with ``<0xNN>`` byte fallback), and needs no pre-tokenisation (no regex split of the raw string).
  A teacher missing some byte falls back to its own tokenisation of the decoded token
  (``convert_tokens_to_string`` + ``encode(..., add_special_tokens=False)``);
* **mean**: nothing to average (an unused id, an unknown special): the mean of all teacher rows.

This is the "mean of subword embeddings" initialisation of Fast Vocabulary Transfer (Gee et al. 2022, "Fast
Vocabulary Transfer for Language Model Compression") and the fallback of WECHSEL (Minixhofer et al. 2022) and FOCUS
(Dobler & de Melo 2023). It is hand-written because no installable, maintained library does it on an in-memory
model: ``wechsel`` and ``deepfocus`` need fastText word vectors or an auxiliary model; mergekit's
``mergekit-tokensurgeon`` works on checkpoint folders through its own CLI and dependency pins, and its
approximations need a donor model. The work here is one pass over the vocabulary (dictionary look-ups) and one
gather + ``index_add_`` on the table: GPT-2's 50k tokens in about a second.

Tied embeddings stay tied (one tensor); an untied ``lm_head`` (and its bias) gets the same treatment on its rows.
``config.vocab_size`` and the bos/eos/pad ids (config and generation config) become the student tokenizer's.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from .vocab_map import TokenBytes, token_bytes

KINDS = ("exact", "special", "split", "mean", "special_mean")


@dataclass(frozen=True)
class TransplantSources:
    """Where each student row comes from.

    Fields:
        pieces: ``pieces[i]`` = the teacher ids whose rows are averaged for student id ``i`` (one id for
            ``exact``/``special``; empty = the mean of all teacher rows).
        kind: ``kind[i]`` in ``KINDS`` (module docstring; ``special_mean``: a special token the teacher lacks).
    """

    pieces: list[list[int]]
    kind: list[str]

    def counts(self) -> dict[str, int]:
        return {k: self.kind.count(k) for k in KINDS}

    def exact_fraction(self) -> float:
        """Share of the student's non-special ids that copy one teacher row (``exact``)."""
        plain = [k for k in self.kind if not k.startswith("special")]
        return plain.count("exact") / max(len(plain), 1)


def _segment(raw: bytes, by_bytes: dict[bytes, int], longest: int) -> list[int] | None:
    """Greedy longest-prefix cut of ``raw`` into teacher tokens; None when some byte has no teacher token."""
    out, at = [], 0
    while at < len(raw):
        for n in range(min(longest, len(raw) - at), 0, -1):
            t = by_bytes.get(raw[at:at + n])
            if t is not None:
                out.append(t)
                at += n
                break
        else:
            return None
    return out


def _preferred(tb: TokenBytes) -> dict[bytes, int]:
    """bytes -> the teacher id that spells them (a normal token before a byte-fallback one, then the lower id)."""
    out: dict[bytes, int] = {}
    for i, b in enumerate(tb.spelling):
        if b and (b not in out or (out[b] in tb.byte_fallback and i not in tb.byte_fallback)):
            out[b] = i
    return out


def transplant_sources(teacher_tok, student_tok) -> TransplantSources:
    """The teacher ids each student id's new row averages (module docstring), for every id of ``student_tok``."""
    t_b, s_b = token_bytes(teacher_tok), token_bytes(student_tok)
    t_vocab, n_t = teacher_tok.get_vocab(), len(t_b)
    by_bytes = _preferred(t_b)
    longest = max(map(len, by_bytes), default=1)
    s_tokens = {i: s for s, i in student_tok.get_vocab().items()}
    n_s = max(len(student_tok), len(s_b))
    pieces: list[list[int]] = [[] for _ in range(n_s)]
    kind = ["mean"] * n_s
    for i in range(n_s):
        raw = s_b.spelling[i] if i < len(s_b) else b""
        name = s_tokens.get(i)
        if raw is None:  # a special token: the teacher's special of the same content, else the mean row
            t = t_b.special.get(name)
            pieces[i], kind[i] = ([t], "special") if t is not None else ([], "special_mean")
            continue
        if not raw:
            continue
        t = t_vocab.get(name)
        if t is not None and t < n_t and t_b.spelling[t] == raw:  # the same raw string, the same bytes
            pieces[i], kind[i] = [t], "exact"
            continue
        t = by_bytes.get(raw)
        if t is not None:
            pieces[i], kind[i] = [t], "exact"
            continue
        cut = _segment(raw, by_bytes, longest)
        if cut is None:  # the teacher lacks some byte: its own tokenisation of the decoded string
            text = student_tok.convert_tokens_to_string([name]) if name is not None else raw.decode("utf-8", "replace")
            cut = [t for t in teacher_tok.encode(text, add_special_tokens=False) if t < n_t and t_b.spelling[t]]
        if cut:
            pieces[i], kind[i] = cut, "split"
    return TransplantSources(pieces, kind)


def _new_rows(old: torch.Tensor, sources: TransplantSources, n_teacher: int) -> torch.Tensor:
    """``(V_s, ...)`` rows from ``old`` (``(V_t', ...)``, a weight or a bias): single sources copied bit for bit,
    several averaged (fp32 sums), none = the mean of the first ``n_teacher`` rows."""
    src = old.detach()
    dev = src.device
    lens = torch.tensor([len(p) for p in sources.pieces], dtype=torch.long)  # (V_s,)
    flat = torch.tensor(list(itertools.chain.from_iterable(sources.pieces)), dtype=torch.long)  # (Σ lens,)
    first = torch.cumsum(lens, 0) - lens  # each student id's first entry in ``flat``
    out = src[:n_teacher].float().mean(0).to(src.dtype).expand(len(lens), *src.shape[1:]).clone()
    one = (lens == 1).nonzero().squeeze(1)
    out[one.to(dev)] = src[flat[first[one]].to(dev)]
    many = (lens > 1).nonzero().squeeze(1)
    if many.numel():
        dst = torch.repeat_interleave(torch.arange(len(lens)), lens)  # (Σ lens,): the student id of each entry
        keep = lens[dst] > 1
        rank = torch.cumsum(lens > 1, 0) - 1  # student id -> its row among the ``many``
        sums = torch.zeros(many.numel(), *src.shape[1:], dtype=torch.float32, device=dev)
        sums.index_add_(0, rank[dst[keep]].to(dev), src[flat[keep].to(dev)].float())  # (M, d): Σ of the pieces
        n = lens[many].to(dev, torch.float32).view(-1, *([1] * (src.dim() - 1)))
        out[many.to(dev)] = (sums / n).to(src.dtype)
    return out


def transplant_vocabulary(model, teacher_tok, student_tok, sources: TransplantSources | None = None):
    """Replace ``model``'s vocabulary (``teacher_tok``'s) by ``student_tok``'s, in place; returns ``model``.

    Input embedding ``(V_t, d)`` -> ``(V_s, d)`` row by row from :func:`transplant_sources`; a tied output head
    points at the new table, an untied one ``(V_t, d)`` (+ bias ``(V_t,)``) is rebuilt the same way.
    """
    sources = sources or transplant_sources(teacher_tok, student_tok)
    n_s, n_t = len(sources.pieces), len(teacher_tok)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    pad = getattr(student_tok, "pad_token_id", None)
    new_emb = torch.nn.Embedding(n_s, emb.weight.shape[1], padding_idx=pad if pad is not None and pad < n_s else None,
                                 device=emb.weight.device, dtype=emb.weight.dtype)
    with torch.no_grad():
        new_emb.weight.copy_(_new_rows(emb.weight, sources, n_t))
    new_emb.weight.requires_grad_(emb.weight.requires_grad)
    model.set_input_embeddings(new_emb)
    if head is not None:
        new_head = torch.nn.Linear(head.weight.shape[1], n_s, bias=head.bias is not None,
                                   device=head.weight.device, dtype=head.weight.dtype)
        with torch.no_grad():
            if tied:
                new_head.weight = new_emb.weight  # one tensor, as before
            else:
                new_head.weight.copy_(_new_rows(head.weight, sources, n_t))
            if head.bias is not None:
                new_head.bias.copy_(_new_rows(head.bias, sources, n_t))
        model.set_output_embeddings(new_head)
    ids = {k: getattr(student_tok, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    model.config.vocab_size = n_s
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is not None:
            for k, v in ids.items():
                setattr(cfg, k, v)
    return model
