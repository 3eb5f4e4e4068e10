"""On-policy distillation (GKD) batches and sequence-level KD data.

GKD (Agarwal et al., 2024) trains on a fraction λ = ``generation.on_policy_fraction`` of the steps
on sequences the student samples itself; the teacher scores them and the divergence is taken on the
generated tokens only. ``choose_on_policy`` decides per step (a pure function of seed and step, so
a resumed run makes the same choices); ``on_policy_batch`` turns a supervised batch into such a
batch. ``teacher_generate_dataset`` is sequence-level KD (Kim & Rush, 2016): the teacher answers
the prompts once and its answers become chat training records.

Batch convention (docs/architecture.md): ``input_ids (B, T)``, ``labels (B, T)`` already shifted
(``labels[b, t]`` is the token after ``input_ids[b, :t+1]``, ``-100`` = no loss),
``attention_mask (B, T)`` with 1 on real tokens.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .errors import DistilleryError
from .generate import sample

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")  # chat turn ends of common templates


def choose_on_policy(step: int, fraction: float, seed: int) -> bool:
    """True when optimizer step ``step`` trains on student samples (probability ``fraction``).

    A pure function of ``(seed, step)``: resuming at step ``s`` repeats the uninterrupted run's choices.
    ``fraction`` 0 is never, 1 is always.
    """
    if fraction <= 0:
        return False
    if fraction >= 1:
        return True
    return random.Random(f"distillery-on-policy:{seed}:{step}").random() < fraction


COLLAPSE_NLL = 0.01   # nats per sampled token: a sampler this certain repeats itself (a healthy LM: 1-5)
COLLAPSE_STEPS = 3    # consecutive on-policy steps below it


class CollapseGuard:
    """Notices a student that has collapsed onto its own samples.

    On an on-policy step the student's mean ``-log q`` of the tokens it just sampled estimates its entropy
    there. Seen in ``benchmarks/quality.py``'s JSD(0.5) on-policy run from a pruned student at lr 2e-3: within
    6 steps it fell to 0.0004 (one token, repeated); the teacher, seeing the repetition, agreed (its perplexity
    of those samples: 3), so the on-policy loss was low while the divergence on real text saturated near ln 2
    and its gradient vanished; the run never recovered. ``update`` returns a one-line message when the value
    stays below ``threshold`` for ``patience`` on-policy steps in a row, else None; a step at or above it
    resets the count.
    """

    def __init__(self, threshold: float = COLLAPSE_NLL, patience: int = COLLAPSE_STEPS):
        self.threshold, self.patience = threshold, patience
        self.low: list[tuple[int, float]] = []  # (step, -log q) of the current run of certain steps

    def update(self, step: int, own_nll: float) -> str | None:
        if own_nll >= self.threshold:
            self.low = []
            return None
        self.low.append((step, own_nll))
        if len(self.low) < self.patience:
            return None
        seen = ", ".join(f"step {s} {v:.2g}" for s, v in self.low[-self.patience:])
        return (f"the student's on-policy samples have collapsed: it is certain of every token it samples "
                f"(its -log q of them, nats per token: {seen}; a healthy student: 1-5; the run this guard comes from "
                f"repeated one token and never recovered). Start on-policy later "
                f"(generation.on_policy_start, after supervised KD) or lower train.lr; "
                f"generation.collapse_guard=warn continues anyway")


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Ids that end a generation: the tokenizer's EOS, the model's generation-config EOS ids, and the
    chat end-of-turn token (``<|im_end|>`` etc.) when the vocabulary has one."""
    ids: list[int] = []
    candidates = [getattr(tokenizer, "eos_token_id", None)]
    gen_cfg = getattr(model, "generation_config", None)
    candidates.append(getattr(gen_cfg, "eos_token_id", None))
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    candidates += [vocab.get(tok) for tok in END_OF_TURN]
    for c in candidates:
        for i in ([c] if isinstance(c, int) else list(c or [])):
            if i is not None and i not in ids:
                ids.append(int(i))
    if not ids:
        raise DistilleryError("on-policy generation needs an EOS token: the tokenizer defines none")
    return ids


def prompt_lengths(labels: torch.Tensor, attention_mask: torch.Tensor, prompt_tokens: int) -> torch.Tensor:
    """``(B,)`` prompt length of each row.

    Chat rows (no loss on the first position) end their prompt where the loss begins: if ``labels[b, t0]``
    is the first target, the prompt is ``input_ids[b, :t0 + 1]`` (its next token is the first
    assistant token). Plain-text rows (loss from position 0) take their first ``prompt_tokens`` tokens.
    Both are clipped to the row's real length and to at least one token.
    """
    B, T = labels.shape
    length = attention_mask.long().sum(dim=1)  # (B,)
    target = labels != -100
    first = torch.where(target.any(dim=1), target.long().argmax(dim=1), torch.full((B,), T, device=labels.device))
    chat = ~target[:, 0]
    n = torch.where(chat & (first < T), first + 1, torch.full_like(first, prompt_tokens))
    return torch.minimum(n, length).clamp(min=1)


def left_pad_prompts(input_ids: torch.Tensor, n: torch.Tensor, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-aligned prompts: row ``b`` holds ``input_ids[b, :n[b]]`` at columns ``P - n[b] .. P - 1``.

    Assumes the real tokens of each row start at column 0 (right padding). Returns ``(ids, mask)``,
    both ``(B, P)`` with ``P = max(n)``.
    """
    P = int(n.max())
    col = torch.arange(P, device=input_ids.device)[None, :]  # (1, P)
    src = col - (P - n[:, None])                             # (B, P): source column, negative = padding
    mask = (src >= 0).long()
    ids = input_ids.gather(1, src.clamp(min=0)).masked_fill(mask == 0, pad_token_id)
    return ids, mask


@torch.no_grad()
def on_policy_batch(student, batch: dict, tokenizer, gen_cfg, *, generator: torch.Generator | None = None,
                    eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                    vocab_size: int | None = None) -> dict:
    """Replace the continuations in ``batch`` by the student's own samples.

    Args:
        student: the HF causal LM being trained (sampled in eval mode, no gradients; mode restored).
        batch: supervised batch ``input_ids / labels / attention_mask (B, T)``, right-padded.
        tokenizer: gives the EOS / end-of-turn ids and the pad id (unless passed explicitly).
        gen_cfg: ``GenerationConfig`` (``max_new_tokens``, ``sample_temperature``, ``top_p``,
            ``prompt_tokens``).
        generator: RNG of the draws.

    Returns a new batch on the student's device, right-padded, positions starting at 0 in every row:
    ``input_ids (B, L)`` = prompt + sampled tokens up to and including the first EOS, then pad;
    ``attention_mask (B, L)`` 1 on those real tokens; ``labels (B, L)`` already shifted: the next
    token where that token was generated (so the EOS is a target), -100 on prompt, pad and after EOS.
    ``L = max_b(prompt_b + generated_b)``. The batch's ``index`` is dropped: the sequences are new,
    so a teacher cache cannot score them (a live teacher must). A batch with ``teacher_row`` (chat data across
    tokenizers) keeps it on the prompt's label positions (-1 elsewhere) and gains ``prompt_len (B,)``.
    """
    device = next(student.parameters()).device
    input_ids = batch["input_ids"].to(device)
    mask = batch.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else mask.to(device)
    labels = batch["labels"].to(device)
    eos = eos_token_id if eos_token_id is not None else stop_token_ids(tokenizer, student)
    eos_list = [eos] if isinstance(eos, int) else list(eos)
    if pad_token_id is None:
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_list[0]

    n = prompt_lengths(labels, mask, gen_cfg.prompt_tokens)                     # (B,)
    prompt_ids, prompt_mask = left_pad_prompts(input_ids, n, pad_token_id)       # (B, P)
    seqs, completion = sample(student, prompt_ids, prompt_mask, max_new_tokens=gen_cfg.max_new_tokens,
                              sample_temperature=gen_cfg.sample_temperature, top_p=gen_cfg.top_p,
                              eos_token_id=eos_list, pad_token_id=pad_token_id, generator=generator,
                              vocab_size=vocab_size)                             # (B, P + N)
    P = prompt_ids.shape[1]
    g = completion.sum(dim=1)                                                    # (B,) generated, incl. EOS
    real = n + g                                                                 # (B,) real tokens per row
    L = int(real.max())
    # Shift row b left by its padding P - n[b], so every row starts at column 0 (positions 0.. as in training).
    col = torch.arange(L, device=device)[None, :]                                # (1, L)
    src = (col + (P - n)[:, None]).clamp(max=seqs.shape[1] - 1)                  # (B, L)
    new_mask = (col < real[:, None]).long()
    new_ids = seqs.gather(1, src).masked_fill(new_mask == 0, pad_token_id)
    # labels[t] = ids[t + 1] where position t + 1 holds a generated token: n[b] - 1 <= t < real[b] - 1.
    nxt = torch.cat([new_ids[:, 1:], torch.full_like(new_ids[:, :1], pad_token_id)], dim=1)
    is_target = (col >= (n - 1)[:, None]) & (col < (real - 1)[:, None])
    new_labels = nxt.masked_fill(~is_target, -100)
    out = {"input_ids": new_ids, "attention_mask": new_mask, "labels": new_labels}
    if "teacher_row" in batch:  # chat data across tokenizers (xtok.chat_data): which conversation each prompt is
        rows = batch["teacher_row"].to(device)
        keep = min(L, rows.shape[1])
        prompt_rows = torch.full_like(new_ids, -1)  # (B, L): the row of token t + 1 while it is a prompt token
        prompt_rows[:, :keep] = rows[:, :keep].masked_fill(col[:, :keep] >= (n - 1)[:, None], -1)
        out.update(teacher_row=prompt_rows, prompt_len=n)
    return out


def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


@torch.no_grad()
def teacher_generate_dataset(teacher, prompts: Sequence, out_path: str | Path, *, tokenizer=None,
                             max_new_tokens: int = 256, sample_temperature: float = 0.0, top_p: float = 1.0,
                             batch_size: int = 8, seed: int = 0, system: str | None = None) -> int:
    """Sequence-level KD data: the teacher answers every prompt; write one JSONL record per prompt.

    Args:
        teacher: a live ``Teacher`` (``.model``, ``.tokenizer``) or a bare HF model (then pass ``tokenizer``).
        prompts: strings (one user turn each) or lists of chat messages ending with a user turn.
        out_path: JSONL file to write. With a chat template a record is
            ``{"messages": [..., {"role": "assistant", "content": answer}]}``; without one it is
            ``{"text": prompt + answer}``. The answer is the decoded text before the first EOS.
        sample_temperature: 0 (default) = the teacher's greedy answer (the mode, as in Kim & Rush).

    Returns the number of records written. The file is written to ``out_path + '.tmp'`` and renamed.
    """
    model = teacher if isinstance(teacher, torch.nn.Module) else teacher.model  # bare model or Teacher
    tok = tokenizer or getattr(teacher, "tokenizer", None)
    if tok is None:
        raise DistilleryError("teacher_generate_dataset: pass tokenizer= with a bare model")
    if not prompts:
        raise DistilleryError("teacher_generate_dataset: no prompts given")
    device = next(model.parameters()).device
    chat = bool(getattr(tok, "chat_template", None))
    eos = stop_token_ids(tok, model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    gen = torch.Generator().manual_seed(seed)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    written = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for group in _batches(list(prompts), batch_size):
            convs = [[{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in group]
            if system is not None:
                convs = [[{"role": "system", "content": system}] + c for c in convs]
            if chat:
                encoded = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True) for c in convs]
                encoded = [e["input_ids"] if isinstance(e, dict) or hasattr(e, "keys") else e for e in encoded]
            else:
                if not all(isinstance(p, str) for p in group):
                    raise DistilleryError("teacher_generate_dataset: chat prompts need a tokenizer with a chat template")
                encoded = [tok(p, add_special_tokens=True)["input_ids"] for p in group]
            n = torch.tensor([len(e) for e in encoded], device=device)
            if int(n.min()) == 0:
                raise DistilleryError("teacher_generate_dataset: a prompt tokenizes to nothing")
            right = torch.full((len(encoded), int(n.max())), pad, dtype=torch.long, device=device)
            for i, e in enumerate(encoded):
                right[i, :len(e)] = torch.tensor(e, dtype=torch.long)
            ids, mask = left_pad_prompts(right, n, pad)
            seqs, completion = sample(model, ids, mask, max_new_tokens=max_new_tokens,
                                      sample_temperature=sample_temperature, top_p=top_p, eos_token_id=eos,
                                      pad_token_id=pad, generator=gen)
            P = ids.shape[1]
            for i, conv in enumerate(convs):
                answer_ids = [t for t, c in zip(seqs[i, P:].tolist(), completion[i, P:].tolist()) if c and t not in eos]
                answer = tok.decode(answer_ids, skip_special_tokens=False)
                if chat:
                    record = {"messages": conv + [{"role": "assistant", "content": answer}]}
                else:
                    record = {"text": group[i] + answer}
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
                written += 1
    tmp.replace(out_path)
    return written
