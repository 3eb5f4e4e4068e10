"""``teacher.kind: api_logprobs``: distill from a `distillery generate` data set, using its stored top_logprobs.

The served teacher is gone by the time ``distill`` runs; what is left is its answers and, per
generated token, the server's ``top_logprobs``. This backend turns them into the sparse
:class:`~distillery.targets.TeacherTargets` form of the teacher cache (top-K ids, their log-probs,
one tail bucket, ``loss_temperature = 1``: servers report the unscaled distribution), one row per
answer token, and hands the loss the rows of the label positions of each batch.

**Which tokenizer, and is it the teacher's.** The data are tokenized with the *student's* tokenizer
(a pretrained student's own, else the one of ``teacher.source``, which a built student then
shares). Sparse KD needs the server's tokens to be ids of that tokenizer. The student is taken to
share the teacher's tokenizer unless

* ``teacher.source`` is set and the pretrained student's tokenizer has another vocabulary (the
  vocabulary check of ``students.check_vocab``), or
* more than 1% of the generated tokens, or of the top_logprobs alternatives, have no id in it
  (token bytes -> id through :func:`~distillery.api.targets.token_id_map`), or
* more than half of the records' answers tokenize into other ids than the server's tokens.

Then, and when no record holds top_logprobs, one line says that only the text is used
(sequence-level KD) and the run continues with cross-entropy alone (``kd_weight`` 0,
``ce_weight`` as set, or 1).

**Alignment.** A record's training sequence is built from the pieces the teacher itself saw:
``ids = tokenize(prompt rendered with the generation prompt) + server's answer ids +
tokenize(rest of the rendered conversation)`` (e.g. ``<|im_end|>\\n``). So row ``t`` of the stored
log-probs, the teacher's distribution of answer token ``t`` given the prompt and answer tokens
``< t``, lines up with the position whose label is answer token ``t`` by construction, even where
re-tokenizing the answer text would split it otherwise (a sampled teacher may emit a
non-canonical split): those records are counted (``retokenized``) and trained on the server's
ids. Targets (labels) are the answer tokens and the template's end-of-turn token (CE only: the
server reports no distribution for the stop token); earlier assistant turns of the prompt are
context. A record whose server tokens cannot be placed is used as text only (ordinary chat
rendering, CE) and counted by reason: ``no_logprobs``, ``lost_bytes`` (the server dropped bytes of
a token that splits a character and sent no ``bytes``: llama-cpp-python), ``text_mismatch`` (the
tokens' bytes do not spell the answer), ``unmapped`` (a generated token with no id),
``template`` (the chat template does not render the prompt as a prefix followed by the answer
verbatim). Alternatives with no id (or whose bytes the server lost) are left out of their row,
their mass falling into the tail bucket, and counted. ``K`` is the largest width that at least 95%
of the answer positions reach with their usable alternatives (normally the ``top_logprobs`` asked
for); a position with fewer gets no KD term (CE only) and is counted as a ``short_row``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

import torch

from ..data.chat import has_generation_tags, render_chat
from ..data.readers import read_source, resolve_sources
from ..errors import DistilleryError
from ..targets import TeacherTargets, tail_logprob_outside
from ..api.targets import _entry_bytes, _lost_bytes, alternatives_row, token_id_map

UNMAPPED_LIMIT = 0.01  # share of generated tokens (or alternatives) with no id above which the tokenizers differ
RETOKENIZED_LIMIT = 0.5  # share of records tokenized otherwise than the server did, above which likewise
ROW_COVERAGE = 0.95  # K = the largest width at least this share of answer positions reach
REASONS = ("no_logprobs", "lost_bytes", "text_mismatch", "unmapped", "template")


@dataclass
class Spliced:
    """One record made ready for sparse KD: token ids, target mask, and its answer's target rows."""

    ids: list[int]
    mask: list[int]
    answer_start: int  # index in ``ids`` of the first answer token
    rows: list[list[tuple[float, int]]]  # per answer token: usable (logprob, id), most likely first
    retokenized: bool


@dataclass
class ScanStats:
    """What the scan of the data set found (written to the run summary as ``api_teacher``)."""

    records: int = 0
    kd_records: int = 0
    kd_tokens: int = 0
    text_only: dict = field(default_factory=lambda: {r: 0 for r in REASONS})
    retokenized: int = 0
    generated_tokens: int = 0
    unmapped_tokens: int = 0
    alternatives: int = 0
    unmapped_alternatives: int = 0
    lost_alternatives: int = 0
    short_rows: int = 0
    top_k: int | None = None
    shared_tokenizer: bool = True
    text_only_reason: str | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def splice_answer(messages: list[dict], answer_ids: list[int], tokenizer) -> tuple[list[int], list[int], int]:
    """``(ids, mask, answer_start)`` of a conversation whose last (assistant) turn is given as token ids.

    ``ids = tok(prompt + generation prompt) + answer_ids + tok(rest)``, where ``rest`` is what the
    template writes after the answer; ``mask`` marks the answer and ``rest`` up to its trailing
    whitespace (the end-of-turn token). Raises ``ValueError`` when the template does not render the
    prompt as a prefix followed by the answer text verbatim.
    """
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    before = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    content = messages[-1]["content"]
    if messages[-1]["role"] != "assistant" or not full.startswith(before + content):
        raise ValueError("template")
    prompt = tokenizer(before, add_special_tokens=False, verbose=False)["input_ids"]
    rest = full[len(before) + len(content):]
    enc = tokenizer(rest, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    keep = len(rest.rstrip())  # the end-of-turn token is a target, the newline after it is not
    rest_mask = [int(start < keep) for start, _ in enc["offset_mapping"]]
    ids = list(prompt) + list(answer_ids) + list(enc["input_ids"])
    return ids, [0] * len(prompt) + [1] * len(answer_ids) + rest_mask, len(prompt)


def _answer_prefix(lps: list[dict], answer: bytes) -> int | None:
    """The number of leading server tokens whose bytes spell ``answer`` exactly (None if none do).

    Tokens past the answer (a stop sequence cut from the text, an end token some servers list) are
    left out."""
    if not answer:
        return None
    at = 0
    for n, e in enumerate(lps):
        if at == len(answer):
            return n
        b = _entry_bytes(e)
        if answer[at:at + len(b)] != b:
            return None
        at += len(b)
    return len(lps) if at == len(answer) else None


def prepare_record(raw: dict, messages: list[dict], tokenizer, id_map: dict[bytes, int], stats: ScanStats) -> Spliced | str:
    """A :class:`Spliced` record, or the reason (one of ``REASONS``) it can only be used as text."""
    lps = raw.get("logprobs")
    if not lps or not any(e.get("top_logprobs") for e in lps):
        return "no_logprobs"
    if any(_lost_bytes(e) for e in lps):
        return "lost_bytes"
    n = _answer_prefix(lps, messages[-1]["content"].encode("utf-8") if messages[-1]["role"] == "assistant" else b"")
    if n is None:
        return "text_mismatch"
    lps = lps[:n]
    stats.generated_tokens += n
    answer = [id_map.get(_entry_bytes(e)) for e in lps]
    missing = sum(i is None for i in answer)
    for e in lps:
        for alt in e.get("top_logprobs") or []:
            stats.alternatives += 1
            if _lost_bytes(alt):
                stats.lost_alternatives += 1
            elif _entry_bytes(alt) not in id_map:
                stats.unmapped_alternatives += 1
    if missing:
        stats.unmapped_tokens += missing
        return "unmapped"
    try:
        ids, mask, start = splice_answer(messages, answer, tokenizer)
    except ValueError:
        return "template"
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    retokenized = ids != list(tokenizer(full, add_special_tokens=False, verbose=False)["input_ids"])
    # as api_targets(strict=False), but a row may be short: it is masked, not the record dropped
    rows = [alternatives_row(e, id_map)[0] for e in lps]
    return Spliced(ids, mask, start, rows, retokenized)


def _raw_lines(src) -> dict[int, dict]:
    """``{line number: parsed object}`` of a chat JSONL source (the chat reader validates it again)."""
    out = {}
    with src.open() as fh:
        for lineno, line in enumerate(fh, start=1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue  # read_source reports it with file and line
                if isinstance(obj, dict):
                    out[lineno] = obj
    return out


class SplicedChats:
    """The ``chat_renderer`` handed to ``build_datasets``: spliced records with their rows, others as usual."""

    name = "api_logprobs/v1"

    def __init__(self, tokenizer, spliced: dict[tuple[str, int], tuple[Spliced, int]]):
        self.tokenizer, self.spliced = tokenizer, spliced
        self.use_tags = has_generation_tags(tokenizer)

    def __call__(self, record) -> tuple[list[int], list[int], list[int] | None]:
        hit = self.spliced.get((record.source, record.line))
        if hit is None:
            ids, mask = render_chat(record, self.tokenizer, self.use_tags)
            return ids, mask, None
        sp, first_row = hit
        rows = [-1] * len(sp.ids)
        for t in range(len(sp.rows)):
            rows[sp.answer_start + t] = first_row + t
        return sp.ids, sp.mask, rows


class ApiLogprobTeacher:
    """Sparse targets from the generated records' stored top_logprobs (module docstring).

    ``targets(batch)`` reads ``batch["teacher_row"] (B, T)`` (from ``BlockDataset``): the table row of
    each label position, -1 where there is none (prompt, end-of-turn token, text-only records).
    """

    model = None  # the teacher is gone: only its answers and their top_logprobs remain
    scores_new_text = False  # rows exist only for the stored answers
    name = "api_logprobs"

    def __init__(self, tokenizer, entries: list[str], data_format: str = "auto", text_field: str = "text",
                 tokenizer_mismatch: str | None = None):
        self.tokenizer = tokenizer
        self.stats = ScanStats()
        id_map = token_id_map(tokenizer)
        found: dict[tuple[str, int], Spliced] = {}
        for src in resolve_sources(entries, data_format):
            if src.format != "chat":
                continue
            raw = _raw_lines(src)
            for rec in read_source(src, text_field):
                self.stats.records += 1
                got = prepare_record(raw.get(rec.line, {}), rec.messages, tokenizer, id_map, self.stats)
                if isinstance(got, str):
                    self.stats.text_only[got] += 1
                else:
                    found[(rec.source, rec.line)] = got
        s = self.stats
        s.retokenized = sum(sp.retokenized for sp in found.values())
        reason = tokenizer_mismatch
        if reason is None and (s.unmapped_tokens > UNMAPPED_LIMIT * max(s.generated_tokens, 1)
                               or s.unmapped_alternatives > UNMAPPED_LIMIT * max(s.alternatives, 1)):
            reason = (f"{s.unmapped_tokens:,} of {s.generated_tokens:,} generated tokens and {s.unmapped_alternatives:,} "
                      f"of {s.alternatives:,} top_logprobs alternatives have no id in the student's tokenizer: "
                      "the student does not share the teacher's tokenizer")
        if reason is None and found and s.retokenized > RETOKENIZED_LIMIT * len(found):
            reason = (f"{s.retokenized} of {len(found)} answers tokenize into other ids than the server's tokens "
                      "with the student's tokenizer: the student does not share the teacher's tokenizer")
        if reason is None and not found:
            reason = (f"none of the {s.records} chat records has usable top_logprobs "
                      f"({', '.join(f'{k}: {v}' for k, v in s.text_only.items() if v)})"
                      if s.records else "the data hold no chat records")
        s.shared_tokenizer = reason is None
        s.text_only_reason = reason
        if reason is not None:
            found = {}
        widths = sorted((len(r) for sp in found.values() for r in sp.rows), reverse=True)
        k = max(1, widths[int(ROW_COVERAGE * (len(widths) - 1))]) if widths else 1
        s.top_k = k if widths else None
        spliced, ids, lps, has = {}, [], [], []
        for key, sp in found.items():
            spliced[key] = (sp, len(ids))
            for r in sp.rows:
                full = len(r) >= k
                if not full:  # too few usable alternatives: padded with distinct ids, masked out of the loss
                    taken = {i for _, i in r}
                    r = r + [(-1e4, i) for i in range(len(r) + k) if i not in taken][:k - len(r)]
                ids.append([i for _, i in r[:k]])
                lps.append([v for v, _ in r[:k]])
                has.append(full)
        s.kd_records, s.kd_tokens = len(found), sum(has)
        s.short_rows = len(has) - sum(has)
        self.renderer = SplicedChats(tokenizer, spliced) if found else None
        self.top_ids = torch.tensor(ids, dtype=torch.long).reshape(-1, k)  # (R, K)
        self.top_logprobs = torch.tensor(lps, dtype=torch.float32).reshape(-1, k)  # (R, K)
        self.has_row = torch.tensor(has, dtype=torch.bool)  # (R,)
        self.tail = tail_logprob_outside(self.top_logprobs)  # (R,): the tail of the K kept entries

    @property
    def uses_kd(self) -> bool:
        """True when the sparse KD term can be used (shared tokenizer, at least one usable record)."""
        return self.renderer is not None

    def message(self) -> str:
        """One line for the log: what is used, and the counts."""
        s = self.stats
        if not self.uses_kd:
            return (f"teacher.kind api_logprobs: {s.text_only_reason}; so only the text is used (sequence-level "
                    "KD: cross-entropy on the teacher's answers, no KD term)")
        other = ", ".join(f"{v} {k}" for k, v in s.text_only.items() if v)
        return (f"teacher.kind api_logprobs: sparse KD from the top-{s.top_k} log-probabilities on {s.kd_tokens:,} "
                f"answer tokens of {s.kd_records} of {s.records} records"
                + (f"; text only (CE) for {sum(s.text_only.values())} ({other})" if other else "")
                + f"; {s.retokenized} answers kept the server's tokenization (re-tokenizing the text differs)"
                + f"; {s.unmapped_alternatives} of {s.alternatives:,} alternatives had no id"
                + (f" and {s.lost_alternatives} lost bytes" if s.lost_alternatives else "") + " (mass put in the tail)"
                + (f"; {s.short_rows} positions with fewer than {s.top_k} usable alternatives get no KD term"
                   if s.short_rows else ""))

    def report(self, file=None) -> None:
        print(self.message(), file=file or sys.stderr)

    @property
    def vocab_width(self) -> int:
        return len(self.tokenizer)

    def eval_teacher(self) -> "ApiLogprobTeacher":
        return self

    def prefetch(self, batch: dict) -> None:
        """Nothing to start: the rows are in memory."""

    def identity(self) -> dict:
        return {"name": self.name, "top_k": self.stats.top_k}

    def targets(self, batch: dict, vocab_size: int | None = None) -> TeacherTargets:
        """Sparse targets ``(B, T, K)`` for ``batch``; ``mask`` = label positions that have a row."""
        if vocab_size is not None and vocab_size != len(self.tokenizer):
            raise DistilleryError(f"the api_logprobs targets index {len(self.tokenizer)} vocabulary entries, this "
                                  f"run uses {vocab_size}")
        if not self.uses_kd:  # text only: a placeholder every position of which is masked out (eval: CE only)
            b, t = batch["input_ids"].shape
            return TeacherTargets(topk_ids=torch.zeros(b, t, 1, dtype=torch.long), topk_logprobs=torch.zeros(b, t, 1),
                                  tail_logprob=torch.full((b, t), -1e30), loss_temperature=1.0,
                                  mask=torch.zeros(b, t, dtype=torch.bool), vocab_size=len(self.tokenizer))
        if "teacher_row" not in batch:
            raise DistilleryError("a batch for the api_logprobs teacher needs 'teacher_row' (built by "
                                  "build_datasets with the teacher's chat_renderer)")
        rows = batch["teacher_row"].detach().cpu()  # (B, T)
        r = rows.clamp(min=0)
        mask = (rows >= 0) & self.has_row[r]
        if "labels" in batch:
            mask &= batch["labels"].detach().cpu() != -100
        return TeacherTargets(topk_ids=self.top_ids[r], topk_logprobs=self.top_logprobs[r], tail_logprob=self.tail[r],
                              loss_temperature=1.0, mask=mask, vocab_size=len(self.tokenizer))


def load_api_tokenizer(tcfg, scfg):
    """``(tokenizer, mismatch)``: the tokenizer the data are tokenized with (the student's) and, when the
    recipe names both the teacher's (``teacher.source``) and a pretrained student's own, a one-phrase
    reason they differ (None when they agree or only one is known)."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from .hf import source_tokenizer

    own = None
    if scfg.init == "pretrained" and scfg.pretrained and (Path(scfg.pretrained) / "tokenizer_config.json").is_file():
        own = AutoTokenizer.from_pretrained(scfg.pretrained)
    if own is not None and "source" not in tcfg.model_fields_set:
        return own, None

    teacher_tok = source_tokenizer(tcfg)
    if own is None:
        return teacher_tok, None
    tv, sv = teacher_tok.get_vocab(), own.get_vocab()
    if tv == sv:
        return own, None
    return own, (f"the student's tokenizer ({len(sv):,} tokens) is not teacher.source '{tcfg.source}''s "
                 f"({len(tv):,} tokens; {len(set(tv) - set(sv)):,} missing from the student)")
