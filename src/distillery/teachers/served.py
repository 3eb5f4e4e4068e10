"""``teacher.kind: served``: a teacher behind OpenAI-compatible servers that scores any token sequence.

The teacher lives on its own machines behind a serving engine (vLLM with tensor parallelism and
replicas; llama.cpp on CPUs). distillery sends the sequences it trains on (a batch's blocks, or the
student's on-policy samples) and receives, per position, the teacher's top-k log-probabilities of the
*next* token: the sparse top-k + tail form of :class:`~distillery.targets.TeacherTargets` that a cache
stores (``loss_temperature = 1``: servers report the unscaled distribution).

Per row ``b`` the scored sequence is ``seq = input_ids[b, :n] + [labels[b, n-1]]`` (``n`` = the row's
real tokens; the last label completes the block when it is a target). The row of label position ``t``
(the token after ``seq[: t+1]``) is the server's distribution *after* token ``t``:

* **vLLM** (``engine: vllm``): completions with the token ids as the prompt, ``max_tokens: 1`` and
  ``prompt_logprobs: k`` (a vLLM extension, passed in the body). ``choices[0].prompt_logprobs`` holds one
  entry per prompt token, ``None`` for the first; entry ``i`` maps token ids (JSON keys) to
  ``{"logprob", "rank", "decoded_token"}`` for p(· | seq[:i]): the top ``k`` by rank, plus the prompt
  token itself when it ranks lower (that extra one is dropped, so every row holds exactly the top-k).
  So label position ``t`` takes entry ``t + 1``. Ids are exact.
* **llama.cpp** (``engine: llamacpp``, llama-cpp-python's server started with ``--logits_all true``):
  string prompts only, so the ids are decoded to text, sent with ``echo: true, logprobs: k,
  max_tokens: 1``, and the server's own tokenization (``logprobs.tokens``) is checked against them
  (a mismatch is an error naming the row). For a model without BOS its ``top_logprobs[i]`` is the
  distribution *after* token ``i`` (seen here: after "To" it lists " a", " used"), so label position ``t``
  takes entry ``t``, and position 0 has none (see :func:`llamacpp_rows`). Keys are token texts: they are mapped to ids through the
  teacher's tokenizer (``api.targets.token_id_map``); an alternative with no id (bytes lost splitting a
  character) is left out, its mass falling into the tail bucket.

Throughput: rows are scored concurrently (``teacher.concurrency`` requests in flight, spread round-robin
over ``teacher.base_urls``), and :meth:`ServedTeacher.prefetch` starts a batch's requests before the loop
asks for it, so the server scores the next micro-batches while the student computes. Failures: the
openai client retries connection errors, 429 and 5xx with backoff, honouring Retry-After
(``teacher.max_retries``); after that a :class:`~.protocol.TeacherUnavailable` line names the server, and
``distill`` adds the last checkpoint to resume from. The API key is read from ``teacher.api_key_env`` and
never written anywhere.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..errors import DistilleryError
from ..targets import TeacherTargets, tail_logprob_outside
from .protocol import TeacherUnavailable

PAD_LOGPROB = -1e4  # padding entries of a short row: no mass, distinct ids, never a target


def row_sequence(input_ids: torch.Tensor, labels: torch.Tensor, attention: torch.Tensor | None) -> list[int]:
    """The token ids a server scores for one row ``(T,)``: the real tokens plus the final label when it is one."""
    n = int(attention.sum()) if attention is not None else int(input_ids.shape[0])
    seq = input_ids[:n].tolist()
    if n > 0 and int(labels[n - 1]) != -100:
        seq.append(int(labels[n - 1]))
    return seq


# ------------------------------------------------------------------------------------------- engines

def vllm_request(seq: list[int], k: int) -> dict:
    """Body fields of a vLLM completions request scoring ``seq`` (the model name is added by the caller)."""
    return {"prompt": seq, "max_tokens": 1, "temperature": 0.0, "extra_body": {"prompt_logprobs": k}}


def vllm_rows(choice: dict, seq: list[int], k: int) -> list[list[tuple[float, int]]]:
    """``prompt_logprobs`` of one vLLM choice -> per label position ``t`` (``0 .. len(seq)-2``) the top-k
    ``(logprob, id)`` pairs of the distribution after ``seq[:t+1]``, most likely first."""
    plp = choice.get("prompt_logprobs")
    if not isinstance(plp, list) or len(plp) != len(seq):
        got = "none" if not isinstance(plp, list) else f"{len(plp)} entries"
        raise DistilleryError(f"the vLLM server returned {got} of prompt_logprobs for a {len(seq)}-token prompt "
                              "(is it vLLM, and does --max-logprobs allow teacher.top_logprobs?)")
    rows = []
    for entry in plp[1:]:
        pairs = []
        for key, val in (entry or {}).items():
            lp = val["logprob"] if isinstance(val, dict) else float(val)
            rank = val.get("rank") if isinstance(val, dict) else None
            tid = int(str(key).removeprefix("token_id:"))
            pairs.append((rank if rank is not None else 0, -float(lp), tid, float(lp)))
        pairs.sort()
        rows.append([(lp, tid) for _, _, tid, lp in pairs[:k]])
    return rows


def llamacpp_request(text: str, k: int) -> dict:
    """Body fields of a llama-cpp-python completions request scoring ``text``."""
    return {"prompt": text, "max_tokens": 1, "temperature": 0.0, "echo": True, "logprobs": k}


def llamacpp_rows(choice: dict, seq: list[int], tokenizer, id_map: dict[bytes, int], k: int,
                  bos: bool = False) -> list[list[tuple[float, int]]]:
    """``logprobs`` of one llama-cpp-python echo choice -> rows as :func:`vllm_rows` returns them.

    What llama-cpp-python 0.3 returns (read from its ``_create_completion``): ``tokens`` are its own
    tokenization of the prompt text (a BOS it added is dropped), ``text_offset[i]`` the character offset of
    token ``i`` in the text, and ``top_logprobs[i]`` the top-k of logits row ``i`` of the evaluated sequence,
    plus an entry for ``tokens[i]`` read from that same row. For a model that adds no BOS (``bos`` False), row
    ``i`` is the distribution *after* token ``i``; its extra entry is not a probability of anything and is
    dropped; the row after token 0 is reported as ``None``. With a BOS, row ``i`` is the distribution *of*
    token ``i``, so the one after token ``i`` is row ``i + 1``.

    The server re-tokenizes the text, and may split it otherwise than ``seq`` (a corpus tokenized line by line
    holds "\n" + "\n" where the server reads "\n\n"). A row describes the next token given a text prefix, so it
    serves our label position ``t`` wherever one of the server's tokens ends at the same character as our token
    ``t``; where no server token ends there (inside a token the server merged), the position gets no row (no
    KD term; CE still applies). Rows for fewer than half of the positions mean another tokenizer: an error.
    """
    lp = choice.get("logprobs") or {}
    tokens, tops, offs = lp.get("tokens") or [], lp.get("top_logprobs") or [], lp.get("text_offset") or []
    text = tokenizer.decode(seq, clean_up_tokenization_spaces=False)
    if len(tops) != len(tokens) or len(offs) != len(tokens):
        raise DistilleryError(f"the llama.cpp server returned {len(tokens)} tokens, {len(tops)} top_logprobs and "
                              f"{len(offs)} text offsets: not the echo format of llama-cpp-python 0.3")
    ends = [offs[i + 1] if i + 1 < len(offs) else len(text) for i in range(len(tokens))]
    row_after: dict[int, int] = {}  # character offset -> index of the server's row describing what follows it
    for i, e in enumerate(ends):
        j = i + 1 if bos else i
        if 0 < e <= len(text) and j < len(tops) and tops[j] is not None:
            row_after.setdefault(e, j)
    rows, found = [], 0
    for t in range(len(seq) - 1):
        j = row_after.get(len(tokenizer.decode(seq[:t + 1], clean_up_tokenization_spaces=False)))
        if j is None:
            rows.append([])
            continue
        found += 1
        alts = dict(tops[j])
        if len(alts) > k and not bos:  # the entry llama-cpp-python adds for the echoed token itself
            alts.pop(tokens[j], None)
        pairs = []
        for txt, value in alts.items():
            tid = None if (not txt or "\ufffd" in txt) else id_map.get(txt.encode("utf-8"))
            if tid is not None:
                pairs.append((float(value), tid))
        pairs.sort(key=lambda p: -p[0])
        seen, row = set(), []
        for value, tid in pairs:  # two texts may name one id: keep the first (most likely)
            if tid not in seen:
                seen.add(tid)
                row.append((value, tid))
        rows.append(row[:k])
    if len(seq) > 3 and found < (len(seq) - 1) / 2:
        raise DistilleryError(
            f"the llama.cpp server's tokens of a {len(seq)}-token prompt end where ours do at only {found} positions: "
            "its tokenizer is not the teacher's (teacher.source); use the served model's tokenizer, or a server that "
            "takes token ids (vLLM)")
    return rows


def rows_to_targets(rows_per_batch: list[list[list[tuple[float, int]]]], T: int, k: int,
                    labels: torch.Tensor) -> TeacherTargets:
    """Per-row lists of per-position ``(logprob, id)`` rows -> sparse targets ``(B, T, K)``; a position with
    no row (beyond the scored sequence) or an empty one is masked out of the KD term."""
    B = len(rows_per_batch)
    ids = torch.zeros(B, T, k, dtype=torch.long)
    lps = torch.full((B, T, k), PAD_LOGPROB, dtype=torch.float32)
    ids[:] = torch.arange(k)  # distinct padding ids
    has = torch.zeros(B, T, dtype=torch.bool)
    for b, rows in enumerate(rows_per_batch):
        for t, row in enumerate(rows[:T]):
            if not row:
                continue
            taken = {tid for _, tid in row}
            pad = [i for i in range(len(row) + k) if i not in taken][:k - len(row)]
            ids[b, t] = torch.tensor([tid for _, tid in row] + pad)
            lps[b, t, :len(row)] = torch.tensor([v for v, _ in row])
            has[b, t] = True
    mask = has & (labels != -100)
    return TeacherTargets(topk_ids=ids, topk_logprobs=lps, tail_logprob=tail_logprob_outside(lps),
                          loss_temperature=1.0, mask=mask)


# ------------------------------------------------------------------------------------------- teacher

class ServedTeacher:
    """The ``served`` backend of :class:`~.protocol.Teacher` (module docstring)."""

    model = None  # the teacher lives on its servers
    scores_new_text = True

    def __init__(self, base_urls: list[str], tokenizer, *, served_model: str | None = None, engine: str = "auto",
                 top_logprobs: int = 20, api_key: str | None = None, timeout_s: float = 120.0,
                 max_retries: int = 6, concurrency: int = 8, prefetch: int = 2, name: str | None = None,
                 clients: list | None = None):
        if not base_urls and clients is None:
            raise DistilleryError("teacher.kind 'served' needs teacher.base_urls (e.g. [http://localhost:8000/v1])")
        import openai

        self.base_urls = list(base_urls)
        self.tokenizer = tokenizer
        self.k = top_logprobs
        self.prefetch_depth = prefetch
        self._clients = clients if clients is not None else [
            openai.OpenAI(base_url=u, api_key=api_key or "EMPTY", timeout=timeout_s, max_retries=max_retries)
            for u in self.base_urls]
        self._next_client = itertools.cycle(range(len(self._clients)))
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="served-teacher")
        self._pending: OrderedDict[str, Future] = OrderedDict()  # row key -> its request, oldest first
        self.served_model = served_model or self._first_model()
        self.engine = engine if engine != "auto" else self._detect_engine()
        self.name = name or self.served_model
        self._id_map = None
        if self.engine == "llamacpp":
            from ..api.targets import token_id_map

            self._id_map = token_id_map(tokenizer)
            bos_id = tokenizer.bos_token_id  # does the served model put a BOS before a text prompt?
            self._adds_bos = bos_id is not None and tokenizer("a").input_ids[:1] == [bos_id]

    @classmethod
    def from_config(cls, tcfg) -> "ServedTeacher":
        """Open the servers a ``TeacherConfig`` names; the tokenizer comes from ``teacher.source``."""
        from .hf import source_tokenizer

        key = None
        if tcfg.api_key_env:
            key = os.environ.get(tcfg.api_key_env)
            if not key:
                raise DistilleryError(f"teacher.api_key_env names {tcfg.api_key_env}, which is not set")
        return cls(tcfg.base_urls, source_tokenizer(tcfg), served_model=tcfg.served_model, engine=tcfg.engine,
                   top_logprobs=tcfg.top_logprobs, api_key=key, timeout_s=tcfg.timeout_s,
                   max_retries=tcfg.max_retries, concurrency=tcfg.concurrency, prefetch=tcfg.prefetch)

    # -- protocol -------------------------------------------------------------------------------
    @property
    def vocab_width(self) -> int:
        return len(self.tokenizer)

    def eval_teacher(self) -> "ServedTeacher":
        return self

    def identity(self) -> dict:
        return {"name": self.name, "served": True, "engine": self.engine, "top_logprobs": self.k}

    def prefetch(self, batch: dict) -> None:
        """Start scoring ``batch``'s rows now; :meth:`targets` of the same batch collects them."""
        if self.prefetch_depth == 0:
            return
        cap = (self.prefetch_depth + 1) * max(len(batch["input_ids"]), 1)
        with self._lock:
            for key in [k for k, f in self._pending.items() if f.done()][:max(len(self._pending) - cap, 0)]:
                del self._pending[key]  # scored but never collected (e.g. the step went on-policy): forget
            if len(self._pending) >= cap:
                return  # bounded: never more than teacher.prefetch micro-batches ahead
        for seq in self._sequences(batch):
            self._submit(seq)

    def targets(self, batch: dict, vocab_size: int | None = None) -> TeacherTargets:
        """Sparse top-k targets ``(B, T, K)`` for ``batch`` (waits for any prefetched rows)."""
        if vocab_size is not None and vocab_size != len(self.tokenizer):
            raise DistilleryError(f"the served teacher's tokenizer has {len(self.tokenizer)} entries, this run uses "
                                  f"{vocab_size}")
        labels = batch["labels"].cpu()
        futures = [self._submit(seq) for seq in self._sequences(batch)]
        rows = []
        for fut in futures:
            rows.append(fut.result())
        with self._lock:
            for key in [k for k, f in self._pending.items() if f in futures]:
                del self._pending[key]
        return rows_to_targets(rows, labels.shape[1], self.k, labels)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- requests -------------------------------------------------------------------------------
    def _sequences(self, batch: dict) -> list[list[int]]:
        ids, labels = batch["input_ids"].cpu(), batch["labels"].cpu()
        att = batch.get("attention_mask")
        att = None if att is None else att.cpu()
        return [row_sequence(ids[b], labels[b], None if att is None else att[b]) for b in range(ids.shape[0])]

    def _submit(self, seq: list[int]) -> Future:
        key = hashlib.sha1(torch.tensor(seq, dtype=torch.int64).numpy().tobytes()).hexdigest()
        with self._lock:
            fut = self._pending.get(key)
            if fut is None or (fut.done() and fut.exception() is not None):
                fut = self._pool.submit(self._score, seq, next(self._next_client))
                self._pending[key] = fut
        return fut

    def _score(self, seq: list[int], client_index: int) -> list[list[tuple[float, int]]]:
        """One row: request, parse. Raises :class:`TeacherUnavailable` once the client's retries are spent."""
        import openai

        client = self._clients[client_index]
        body = (vllm_request(seq, self.k) if self.engine == "vllm"
                else llamacpp_request(self.tokenizer.decode(seq), self.k))
        try:
            resp = client.completions.create(model=self.served_model, **body)
        except (openai.APIConnectionError, openai.APITimeoutError, openai.InternalServerError,
                openai.RateLimitError) as exc:
            raise TeacherUnavailable(f"teacher server {self._url(client_index)} did not answer after "
                                     f"{client.max_retries} retries ({type(exc).__name__})") from None
        except openai.APIStatusError as exc:
            raise DistilleryError(f"teacher server {self._url(client_index)} refused a scoring request: "
                                  f"HTTP {exc.status_code} {str(exc.message).splitlines()[0][:200]}") from None
        choice = resp.choices[0].model_dump()
        if self.engine == "vllm":
            return vllm_rows(choice, seq, self.k)
        return llamacpp_rows(choice, seq, self.tokenizer, self._id_map, self.k, bos=self._adds_bos)

    def _url(self, i: int) -> str:
        return self.base_urls[i] if i < len(self.base_urls) else f"client {i}"

    def _first_model(self) -> str:
        import openai

        try:
            models = self._clients[0].models.list().data
        except openai.APIError as exc:
            raise TeacherUnavailable(f"teacher server {self._url(0)}: cannot list its models "
                                     f"({type(exc).__name__})") from None
        if not models:
            raise DistilleryError(f"teacher server {self._url(0)} serves no model")
        return models[0].id

    def _detect_engine(self) -> str:
        """vLLM answers ``GET /version`` at the server root; llama-cpp-python does not."""
        import json
        import urllib.request

        root = str(self._clients[0].base_url).rstrip("/").removesuffix("/v1")
        try:
            with urllib.request.urlopen(f"{root}/version", timeout=10) as r:
                if r.status == 200 and "version" in json.loads(r.read()):
                    return "vllm"
        except (OSError, ValueError):  # urllib's HTTPError/URLError are OSErrors
            pass
        return "llamacpp"
