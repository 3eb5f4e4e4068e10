"""Answer fidelity for instruct teachers: do the student's answers read like the teacher's?

For each held-out prompt, the teacher and the student answer it through their own chat templates, once
greedily and once sampled (``sample_temperature``, no top-k/top-p, seeded). Every answer ``a`` is scored:

- ``teacher_logprob_per_byte`` (nats/byte; higher = more teacher-like): with the teacher's tokenization
  ``c`` of the chat-formatted prompt and ``y_1..y_m`` of ``a``,
  ``sum_j log p_teacher(y_j | c, y_<j) / len(a.encode("utf-8"))``; ``None`` for an empty answer.
  Per byte, not per token, so answers of any tokenizer and length compare.
- ``rouge_l`` (vs the teacher's greedy answer): ROUGE-L F-measure from Google's ``rouge-score`` package
  (LCS over its lower-cased alphanumeric tokens, no stemming): ``F = 2PR / (P + R)``, ``P = LCS/|pred|``,
  ``R = LCS/|ref|``. The teacher's own sampled answer gets one too: the ceiling a student can expect.
- degeneration over whitespace tokens: ``distinct_2`` = unique bigrams / bigrams (``None`` below two
  tokens) and ``longest_repeated_ngram`` = the largest ``n`` such that some ``n`` consecutive tokens occur
  at two different positions (overlaps allowed; 0 when nothing repeats).
- degeneration over characters, which whitespace tokens miss (``"1.1.1.1.1"`` is one token):
  ``distinct_char_4`` = unique character 4-grams / 4-grams (``None`` below 4 characters; ~0.8-1 for prose,
  near 0 for a loop) and ``repeat_share`` = (length of the longest substring that occurs at two positions,
  overlaps allowed) / length (0 for an empty answer; ``"abcabcabc"`` -> 6/9).
- ``empty_or_whitespace``: the answer has no visible character.

A tokenizer without a chat template gets the bare prompt plus a newline; the output records which.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import DistilleryError

ANSWERS = ("teacher_greedy", "teacher_sampled", "student_greedy", "student_sampled")

# Used when no --fidelity-prompts file is given: short, general, and not drawn from any training text here.
DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for sleeping better.",
    "Write a short poem about the sea.",
    "What is the difference between weather and climate?",
    "How do plants make their food?",
    "Describe a cat to someone who has never seen one.",
    "Why do we have seasons on Earth?",
    "What should I pack for a weekend hiking trip?",
    "Summarise the story of Romeo and Juliet in three sentences.",
    "How can I learn a new language faster?",
    "What is a prime number? Give two examples.",
)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a ``.jsonl`` file (``{"prompt": "..."}`` per line) or a text file (one prompt per line)."""
    p = Path(path)
    if not p.is_file():
        raise DistilleryError(f"prompts file '{p}' does not exist")
    prompts = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DistilleryError(f"{p}:{n}: not JSON ({exc.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
                raise DistilleryError(f"{p}:{n}: each line needs a non-empty string \"prompt\"")
            prompts.append(rec["prompt"])
        else:
            prompts.append(line.strip())
    if not prompts:
        raise DistilleryError(f"prompts file '{p}' holds no prompt")
    return prompts


def chat_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of ``prompt`` as one user turn plus the assistant header (bare prompt + newline without a template)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt + "\n"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def stop_ids(model, tokenizer) -> list[int]:
    """Ids that end an answer: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def answer_batch(model, tokenizer, prompts: list[str], *, max_new_tokens: int, sample_temperature: float = 0.0,
                 top_p: float = 1.0, generator: torch.Generator | None = None) -> list[str]:
    """One answer per prompt of one batch: the chat-formatted prompts left-padded and continued by
    :func:`distillery.generate.sample` (greedy when ``sample_temperature == 0``), each cut before its first stop token
    and decoded with special tokens dropped.

    ``sample`` rather than ``model.generate``: its static decoder (Llama-shaped models) answered 96 held-out prompts
    at batch 32 in 7.8 s against 13.3 s for the demo student and 42 s against 54 s for SmolLM2-135M on the AVX2 EPYC,
    the same greedy answers (all 96 identical); any other causal LM runs through the model's own forward and cache.
    """
    from ..generate import sample

    stops = stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    device = next(model.parameters()).device
    seqs = [chat_ids(tokenizer, p) for p in prompts]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for row, s in enumerate(seqs):  # left padding: every prompt ends at the last column
        ids[row, width - len(s):] = torch.tensor(s)
        mask[row, width - len(s):] = 1
    out, _ = sample(model, ids.to(device), mask.to(device), max_new_tokens=max_new_tokens,
                    sample_temperature=sample_temperature, top_p=top_p, eos_token_id=stops or None, pad_token_id=pad,
                    generator=generator)
    answers = []
    for row in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        answers.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return answers


def generate_answers(model, tokenizer, prompts: list[str], *, do_sample: bool, max_new_tokens: int = 64,
                     sample_temperature: float = 1.0, seed: int = 0, batch_size: int = 8) -> list[str]:
    """One answer per prompt (:func:`answer_batch`), in prompt order; decoding stops at the tokenizer's or model's EOS.

    The prompts are batched in order of their token length (less left padding). Sampled answers draw from
    softmax(logits / ``sample_temperature``) over the whole vocabulary (no top-k, no top-p), batch ``k`` of that
    order with ``torch.Generator().manual_seed(seed + k)``: the same model, prompts and seed give the same answers.
    """
    lengths = [len(chat_ids(tokenizer, p)) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (lengths[i], i))
    answers: list[str] = [""] * len(prompts)
    for k, start in enumerate(range(0, len(order), batch_size)):
        batch = order[start:start + batch_size]
        got = answer_batch(model, tokenizer, [prompts[i] for i in batch], max_new_tokens=max_new_tokens,
                           sample_temperature=sample_temperature if do_sample else 0.0,
                           generator=torch.Generator().manual_seed(seed + k) if do_sample else None)
        for i, a in zip(batch, got):
            answers[i] = a
    return answers


@torch.no_grad()
def teacher_logprob_per_byte(model, tokenizer, prompts: list[str], answers: list[str], *,
                             batch_size: int = 8) -> list[float | None]:
    """Per-byte log-likelihood (nats/byte) of each answer given its chat-formatted prompt (module docstring)."""
    device = next(model.parameters()).device
    items = []
    for i, (p, a) in enumerate(zip(prompts, answers)):
        ans = tokenizer(a, add_special_tokens=False)["input_ids"]
        if a and ans:
            items.append((i, chat_ids(tokenizer, p), ans))
    out: list[float | None] = [None] * len(answers)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        width = max(len(c) + len(a) for _, c, a in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        target = torch.zeros(len(chunk), width, dtype=torch.bool)  # True at answer tokens
        for row, (_, c, a) in enumerate(chunk):
            ids[row, :len(c) + len(a)] = torch.tensor(c + a)
            mask[row, :len(c) + len(a)] = 1
            target[row, len(c):len(c) + len(a)] = True
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()  # (B, T-1, V)
        logp = F.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None].to(device)).squeeze(-1).cpu()  # (B, T-1)
        sums = (logp * target[:, 1:]).sum(dim=1)
        for row, (i, _, _) in enumerate(chunk):
            out[i] = float(sums[row]) / len(answers[i].encode("utf-8"))
    return out


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of ``prediction`` against ``reference`` (``rouge-score``, no stemming)."""
    try:
        from rouge_score import rouge_scorer
    except ModuleNotFoundError:
        raise DistilleryError("answer fidelity needs the rouge-score package: pip install 'distillery[eval]'") from None
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False).score(reference, prediction)["rougeL"].fmeasure


def distinct_2(text: str) -> float | None:
    """Unique whitespace-token bigrams / bigrams; ``None`` when the text has fewer than two tokens."""
    toks = text.split()
    bigrams = list(zip(toks, toks[1:]))
    return len(set(bigrams)) / len(bigrams) if bigrams else None


def longest_repeated_ngram(text: str) -> int:
    """Largest ``n`` such that some ``n`` consecutive whitespace tokens occur at two positions (overlap allowed).

    ``lcp[i][j]`` = length of the common run starting at tokens ``i`` and ``j``, filled from the end, O(n^2)
    for answers of a few hundred tokens.
    """
    toks = text.split()
    n = len(toks)
    best = 0
    nxt = [0] * (n + 1)  # lcp row i+1
    for i in range(n - 1, -1, -1):
        cur = [0] * (n + 1)
        for j in range(n - 1, i, -1):
            if toks[i] == toks[j]:
                cur[j] = nxt[j + 1] + 1
                best = max(best, cur[j])
        nxt = cur
    return best


def distinct_char_4(text: str) -> float | None:
    """Unique character 4-grams / character 4-grams; ``None`` when the text has fewer than 4 characters."""
    grams = [text[i:i + 4] for i in range(len(text) - 3)]
    return len(set(grams)) / len(grams) if grams else None


def repeat_share(text: str) -> float:
    """(Longest substring occurring at two positions, overlap allowed) / ``len(text)``; 0.0 for ``""``.

    Binary search on the length ``L``: a repeat of length ``L`` implies one of every shorter length, so the
    predicate "some length-``L`` substring occurs twice" is monotone; each probe is one pass with a set.
    """
    n = len(text)
    lo, hi = 0, max(n - 1, 0)  # a repeat is at most n - 1 long (two distinct start positions)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        seen, found = set(), False
        for i in range(n - mid + 1):
            piece = text[i:i + mid]
            if piece in seen:
                found = True
                break
            seen.add(piece)
        lo, hi = (mid, hi) if found else (lo, mid - 1)
    return lo / n if n else 0.0


def greedy_spread(answers: list[str]) -> dict:
    """Distinct-2 over many answers, with what a mean over few would hide: ``distinct_2`` (mean over the answers
    of two or more words), its standard error (sample standard deviation / sqrt(n)), the lowest answer's, how many
    answers were scored and given, and ``empty_or_whitespace`` (a count). Over 12 answers the mean of a small
    student moves by up to +-0.24 between disjoint prompt sets (``benchmarks/results/wide_heldout.json``)."""
    import statistics

    d2 = [d for d in map(distinct_2, answers) if d is not None]
    return {"answers": len(answers), "scored": len(d2), "distinct_2": statistics.mean(d2) if d2 else None,
            "distinct_2_stderr": statistics.stdev(d2) / len(d2) ** 0.5 if len(d2) > 1 else None,
            "distinct_2_min": min(d2, default=None), "empty_or_whitespace": sum(not a.strip() for a in answers)}


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def score_fidelity(teacher_model, teacher_tok, student_model, student_tok, prompts: list[str] | None = None, *,
                   max_new_tokens: int = 64, sample_temperature: float = 1.0, seed: int = 0,
                   batch_size: int = 8, teacher_answers: dict[str, list[str]] | None = None,
                   teacher_ll: dict[str, list[float | None]] | None = None) -> dict:
    """Answers of teacher and student to ``prompts`` (default :data:`DEFAULT_PROMPTS`), scored side by side.

    Returns ``{"records": [{"prompt", "answers": {name: text}, "scores": {name: {...}}}], "means": {name:
    {"teacher_logprob_per_byte", "rouge_l", "distinct_2", "longest_repeated_ngram", "distinct_char_4",
    "repeat_share", "empty_or_whitespace"}},
    "settings": {...}}`` for the four answers in :data:`ANSWERS`; ``empty_or_whitespace`` in ``means`` is a count.
    ``teacher_answers`` (``{"teacher_greedy": [...], "teacher_sampled": [...]}`` from an earlier result's records,
    same prompts and settings) skips the teacher's generation when several students are scored; ``teacher_ll``
    (``{"teacher_greedy": [...], ...}``: the teacher's per-byte log-likelihoods of those answers, from the same earlier
    records) skips scoring them again.
    """
    prompts = list(DEFAULT_PROMPTS if prompts is None else prompts)
    if not prompts:
        raise DistilleryError("answer fidelity: no prompts")
    t0 = time.perf_counter()
    answers = {}
    if teacher_answers is not None:
        answers = {k: list(teacher_answers[k]) for k in ("teacher_greedy", "teacher_sampled")}
        if any(len(v) != len(prompts) for v in answers.values()):
            raise DistilleryError("answer fidelity: teacher_answers must hold one answer per prompt")
    for who, model, tok in (("teacher", teacher_model, teacher_tok), ("student", student_model, student_tok)):
        for mode in ("greedy", "sampled"):
            if f"{who}_{mode}" in answers:
                continue
            answers[f"{who}_{mode}"] = generate_answers(model, tok, prompts, do_sample=mode == "sampled",
                                                        max_new_tokens=max_new_tokens, batch_size=batch_size,
                                                        sample_temperature=sample_temperature, seed=seed)
    ll = {name: list(teacher_ll[name]) if teacher_ll and name in teacher_ll else
          teacher_logprob_per_byte(teacher_model, teacher_tok, prompts, answers[name], batch_size=batch_size)
          for name in ANSWERS}
    if any(len(v) != len(prompts) for v in ll.values()):
        raise DistilleryError("answer fidelity: teacher_ll must hold one log-likelihood per prompt")
    records = []
    for i, prompt in enumerate(prompts):
        ref = answers["teacher_greedy"][i]
        scores = {}
        for name in ANSWERS:
            a = answers[name][i]
            scores[name] = {"teacher_logprob_per_byte": ll[name][i],
                            "rouge_l": None if name == "teacher_greedy" else rouge_l(a, ref),
                            "distinct_2": distinct_2(a), "longest_repeated_ngram": longest_repeated_ngram(a),
                            "distinct_char_4": distinct_char_4(a), "repeat_share": repeat_share(a),
                            "empty_or_whitespace": not a.strip()}
        records.append({"prompt": prompt, "answers": {n: answers[n][i] for n in ANSWERS}, "scores": scores})
    means = {}
    for name in ANSWERS:
        rows = [r["scores"][name] for r in records]
        means[name] = {k: _mean(r[k] for r in rows)
                       for k in ("teacher_logprob_per_byte", "rouge_l", "distinct_2", "longest_repeated_ngram",
                          "distinct_char_4", "repeat_share")}
        means[name]["empty_or_whitespace"] = sum(r["empty_or_whitespace"] for r in rows)
    settings = {"n_prompts": len(prompts), "max_new_tokens": max_new_tokens, "sample_temperature": sample_temperature,
                "seed": seed, "teacher_chat_template": bool(getattr(teacher_tok, "chat_template", None)),
                "student_chat_template": bool(getattr(student_tok, "chat_template", None)),
                "seconds": round(time.perf_counter() - t0, 2)}
    return {"records": records, "means": means, "settings": settings}
