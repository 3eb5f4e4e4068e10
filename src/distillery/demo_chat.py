"""The demo's chat data: prompts about the bundled public-domain text, answered once by the teacher.

Prompts (:func:`demo_prompts`) pair an instruction (explain, continue, summarise, ...) with a short passage:
speeches of two to four lines from the eight Shakespeare plays for training, three-line windows of Milton's
*Paradise Lost* for the held-out prompts (never trained on). Both are drawn by ``random.Random(seed)``, so
the same settings give the same prompts on every machine.

The teacher answers them in this process (:func:`teacher_answers`): left-padded batches through
:func:`distillery.generate.sample` (KV cache; a row leaves the batch at its end-of-turn token), greedy
unless ``sample_temperature > 0`` (then nucleus sampling with ``top_p``, seeded). Answers are appended to a JSONL cache, one ``{"i", "prompt", "answer",
"settings"}`` per line, flushed after every batch, so an interrupted demo resumes where it stopped and a
second demo generates nothing. :func:`write_chat` turns answers into the chat JSONL that ``distill`` reads
(system, user, assistant; the loss sees the assistant tokens only).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
import time
from importlib import resources
from pathlib import Path

import torch

from .errors import DistilleryError
from .tasks.fidelity import answer_batch

TEMPLATES = (
    "Explain in plain modern English what this passage means:\n\n{p}",
    "Continue this passage with a few more lines:\n\n{p}",
    "Summarise this passage in one sentence:\n\n{p}",
    "What is the speaker feeling in these lines? Answer briefly.\n\n{p}",
    "Rewrite these lines in simple modern English:\n\n{p}",
    "Ask one question about this passage and answer it.\n\n{p}",
)


def _corpus(name: str) -> list[str]:
    with (resources.files("distillery") / "assets" / name).open("rb") as fh:
        return gzip.decompress(fh.read()).decode("utf-8").splitlines()


def shakespeare_passages() -> list[str]:
    """Speeches of 2-4 verse lines (60-260 characters): the lines after a speaker's name up to a blank line."""
    out, block = [], []
    for line in _corpus("shakespeare8.txt.gz") + [""]:
        if line.strip():
            block.append(line.strip())
            continue
        # a speech block starts with the speaker's name ("Hor.", "HAMLET."); stage directions are bracketed
        if len(block) >= 3 and block[0].endswith(".") and len(block[0]) <= 24:
            lines = [ln for ln in block[1:] if not ln.startswith(("[", "Enter", "Exit", "Exeunt"))]
            text = "\n".join(lines)
            if 2 <= len(lines) <= 4 and 60 <= len(text) <= 260:
                out.append(text)
        block = []
    return out


def milton_passages(lines_per: int = 3) -> list[str]:
    """Non-overlapping windows of ``lines_per`` verse lines of *Paradise Lost* (no blank or heading line in them)."""
    lines = [ln.strip() for ln in _corpus("paradise_lost.txt.gz")]
    out = []
    for i in range(0, len(lines) - lines_per, lines_per):
        win = lines[i:i + lines_per]
        if all(len(w) > 20 for w in win):
            out.append("\n".join(win))
    return out


def demo_prompts(n: int, corpus: str, seed: int = 0) -> list[str]:
    """``n`` prompts over ``corpus`` ('shakespeare' or 'milton'); the templates take turns, passages are drawn."""
    passages = shakespeare_passages() if corpus == "shakespeare" else milton_passages()
    if n > len(passages):
        raise DistilleryError(f"demo: {n} prompts asked for, the {corpus} text has {len(passages)} passages")
    rng = random.Random(seed)
    picked = rng.sample(passages, n)
    return [TEMPLATES[i % len(TEMPLATES)].format(p=p) for i, p in enumerate(picked)]


def more_heldout_prompts(n: int, exclude: list[str], seed: int = 1234) -> list[str]:
    """``n`` more held-out prompts over Milton (the templates taking turns over passages drawn with ``seed``), none of
    them in ``exclude``. The demo reads its answer goal on these and its own ``exclude``: its few prompts alone
    misread a student's distinct-2 by up to +-0.24 (``benchmarks/wide_heldout.py``, which draws the same ones)."""
    passages = milton_passages()
    picked = random.Random(seed).sample(passages, min(len(passages), n + len(exclude)))
    skip = set(exclude)
    out = [p for p in (TEMPLATES[i % len(TEMPLATES)].format(p=x) for i, x in enumerate(picked)) if p not in skip]
    if len(out) < n:
        raise DistilleryError(f"demo: {n} more held-out prompts asked for, the Milton text gives {len(out)}")
    return out[:n]


def teacher_cache(teacher, home: Path | None = None) -> Path:
    """The folder of what is a pure function of the teacher (its answers, its BLiMP table), shared by every demo:
    ``<DISTILLERY_HOME>/demo/<name>-<first 16 hex digits of teacher.identity()['weights_hash']>``.

    The hash covers the weights as loaded (a bf16 teacher is another teacher), so a second ``make demo`` with the
    same teacher reads its answers from here, whatever its output folder.
    """
    from .teachers.hf import distillery_home

    ident = teacher.identity()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", str(ident["name"]))
    return (home or distillery_home()) / "demo" / f"{slug}-{str(ident['weights_hash'])[:16]}"


def keyed_name(stem: str, key) -> str:
    """``<stem>-<first 12 hex digits of sha256(key as sorted JSON)>``: one cache file per prompts and settings."""
    return f"{stem}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]}"


def answers_path(cache: Path, tag: str, tokenizer, prompts: list[str], **settings) -> Path:
    """Where :func:`teacher_answers` keeps the answers to ``prompts`` under ``settings`` (the chat template in the key:
    it decides what the teacher saw)."""
    key = {"prompts": prompts, "settings": settings, "chat_template": getattr(tokenizer, "chat_template", None)}
    return cache / (keyed_name(f"answers_{tag}", key) + ".jsonl")


def _read_cache(path: Path, prompts: list[str], settings: dict) -> dict[int, str]:
    """Answers already in ``path``; a line for another prompt or other settings is a one-line error."""
    done: dict[int, str] = {}
    if not path.is_file():
        return done
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill mid-write: that prompt is answered again
        i = rec.get("i") if isinstance(rec, dict) else None
        if not isinstance(i, int) or not 0 <= i < len(prompts) or rec.get("prompt") != prompts[i] \
                or rec.get("settings") != settings or not isinstance(rec.get("answer"), str):
            raise DistilleryError(f"{path}:{n}: an answer for other prompts or settings than this demo's; "
                                  "delete the file (or the run folder) to generate them again")
        done[i] = rec["answer"]
    return done


@torch.no_grad()
def teacher_answers(model, tokenizer, prompts: list[str], path: str | Path, *, max_new_tokens: int = 64,
                    sample_temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 16,
                    log=print) -> list[str]:
    """The teacher's answer to every prompt, generated once and cached in ``path`` (JSONL, resumable).

    Greedy when ``sample_temperature == 0`` (``top_p`` and ``seed`` then change nothing), else drawn from
    softmax(logits / sample_temperature) cut to its nucleus of mass ``top_p``. Prompts are sorted by token
    length before batching (less left padding); batch ``k`` of the sorted order draws with
    ``torch.Generator().manual_seed(seed + k)``, so a resumed run samples what an uninterrupted one would.
    Returns the answers in prompt order (decoded new tokens before the first stop token, special tokens dropped).
    """
    if not sample_temperature >= 0 or not 0 < top_p <= 1:
        raise DistilleryError(f"teacher answers: sample_temperature must be >= 0 and top_p in (0, 1] "
                              f"(got {sample_temperature}, {top_p})")
    path = Path(path)
    settings = {"max_new_tokens": max_new_tokens, "sample_temperature": sample_temperature, "seed": seed,
                "batch_size": batch_size}
    if top_p != 1.0:  # recorded only when it cuts: caches written before top_p existed stay valid
        settings["top_p"] = top_p
    done = _read_cache(path, prompts, settings)
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    todo = [(k, b) for k, b in enumerate(batches) if any(i not in done for i in b)]
    if not todo:
        return [done[i] for i in range(len(prompts))]
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = path.read_bytes() if path.is_file() else b""
    if raw and not raw.endswith(b"\n"):  # a line torn by a kill: cut it, or the next record would join it
        path.write_bytes(raw[:raw.rfind(b"\n") + 1])
    t0, answered = time.perf_counter(), 0
    with open(path, "a", encoding="utf-8") as fh:
        for n, (k, batch) in enumerate(todo, 1):
            got = answer_batch(model, tokenizer, [prompts[i] for i in batch], max_new_tokens=max_new_tokens,
                               sample_temperature=sample_temperature, top_p=top_p,
                               generator=torch.Generator().manual_seed(seed + k))
            answered += len(got)
            for i, answer in zip(batch, got):
                done[i] = answer
                fh.write(json.dumps({"i": i, "prompt": prompts[i], "answer": answer, "settings": settings}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            dt = time.perf_counter() - t0
            log(f"  teacher answers {path.name}: batch {n}/{len(todo)}, {answered} answers, {answered / dt:.2f} a second")
    return [done[i] for i in range(len(prompts))]


def write_chat(path: str | Path, prompts: list[str], answers: list[str], system: str | None) -> int:
    """Write ``{"messages": [system?, user, assistant]}`` per non-empty answer; returns how many were written.

    ``system`` is the template's own default system prompt, written out so that the student trains on exactly
    what the teacher saw when it answered (and what answer fidelity renders at test time).
    """
    path = Path(path)
    n = 0
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for p, a in zip(prompts, answers):
            if not a.strip():
                continue  # nothing for the loss to learn from
            msgs = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": p}, {"role": "assistant", "content": a}]
            fh.write(json.dumps({"messages": msgs}) + "\n")
            n += 1
    tmp.replace(path)
    return n


def write_plain(path: str | Path, chars: int, skip_chars: int = 0) -> None:
    """A slice of the Shakespeare text (``chars`` characters from ``skip_chars``) as a plain-text training file."""
    text = "\n".join(_corpus("shakespeare8.txt.gz"))[skip_chars:skip_chars + chars]
    Path(path).write_text(text, encoding="utf-8")
