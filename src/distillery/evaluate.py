"""Fidelity to the teacher on held-out text: perplexities, KL(p_T ‖ q_S), top-1 agreement.

All metrics are token-weighted means over the target positions (``labels != -100``):

* ``teacher_perplexity`` / ``student_perplexity`` = exp(mean cross-entropy of the label token),
* ``kl_teacher_student`` = mean over positions of Σ_v p_T(v) (log p_T(v) − log q_S(v)) (nats, T = 1);
  against a sparse teacher (a cache, an API's top log-probs) at its recorded temperature: with a
  sampled tail, exact on the top-k plus an unbiased estimate of the tail term; without one, the KL over
  the top-k + one tail bucket (a lower bound, see :func:`_sparse_chunk`),
* ``top1_agreement`` = fraction of positions where argmax p_T == argmax q_S,
* ``tokens`` = number of target positions.

Logits are formed chunk by chunk over the target rows (never ``(B, T, V)`` for both models at once).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

import torch
from tqdm.auto import tqdm

from .targets import TeacherTargets


def student_hidden(model, batch: dict) -> torch.Tensor:
    """Final (post-norm) hidden states of a HF causal LM, ``(B, T, H)`` (packed conversations kept apart:
    :func:`distillery.data.pack.model_inputs`)."""
    from .data.pack import model_inputs

    return model.base_model(**model_inputs(batch)).last_hidden_state


@torch.no_grad()
def evaluate(teacher, student, batches: Iterable[dict], *, vocab_size: int | None = None,
             chunk_rows: int = 1024, progress: bool = False, max_batches: int | None = None) -> dict:
    """Compare ``student`` to ``teacher`` (a live ``Teacher``) on ``batches``; returns the metric dict."""
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    head = student.get_output_embeddings()
    sums = {"t_ce": 0.0, "s_ce": 0.0, "kl": 0.0, "agree": 0.0, "tokens": 0, "kd_tokens": 0}
    it = batches if not progress else tqdm(batches, desc="eval", leave=False, total=max_batches)
    for i, batch in enumerate(it):
        if max_batches is not None and i >= max_batches:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch["labels"].reshape(-1)  # (B*T,)
        rows = (labels != -100).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        targets: TeacherTargets = teacher.targets(batch, vocab_size=vocab_size).to(device)
        h = student_hidden(student, batch)
        h = h.reshape(-1, h.shape[-1])  # (B*T, H)
        for start in range(0, rows.numel(), chunk_rows):
            r = rows[start:start + chunk_rows]
            s_logits = torch.nn.functional.linear(h[r], head.weight, head.bias).float()  # (n, V_s)
            y = labels[r]
            if targets.is_sparse:
                _sparse_chunk(sums, s_logits, targets, r, y, vocab_size)
                continue
            t_logits = targets.dense_logits(r).float()  # (n, V_t)
            v = vocab_size or min(s_logits.shape[-1], t_logits.shape[-1])
            s_lp = torch.log_softmax(s_logits[:, :v], dim=-1)
            t_lp = torch.log_softmax(t_logits[:, :v], dim=-1)
            sums["s_ce"] += -s_lp.gather(1, y[:, None]).sum().item()
            sums["t_ce"] += -t_lp.gather(1, y[:, None]).sum().item()
            sums["kl"] += (t_lp.exp() * (t_lp - s_lp)).sum().item()
            sums["agree"] += (t_lp.argmax(-1) == s_lp.argmax(-1)).sum().item()
            sums["tokens"] += r.numel()
            sums["kd_tokens"] += r.numel()
    student.train(was_training)
    n = max(sums["tokens"], 1)
    n_kd = max(sums["kd_tokens"], 1)  # positions with a teacher target (sparse targets may mask some out)
    no_teacher = sums["tokens"] > 0 and sums["kd_tokens"] == 0
    return {
        "teacher_perplexity": None if sums.get("sparse") else _exp(sums["t_ce"] / n),
        "student_perplexity": _exp(sums["s_ce"] / n),
        "kl_teacher_student": None if no_teacher else sums["kl"] / n_kd,
        "top1_agreement": None if no_teacher else sums["agree"] / n_kd,
        "tokens": sums["tokens"],
    }


def evaluate_own_samples(teacher, student, batches: Iterable[dict], tokenizer, gen_cfg, *, seed: int = 0,
                         vocab_size: int | None = None, max_batches: int | None = None) -> dict:
    """The same metrics on text the student writes itself: the measure on-policy distillation targets.

    Each batch's prompt (its chat prompt, or the first ``gen_cfg.prompt_tokens`` tokens of a plain block)
    is continued by the student, exactly as an on-policy training step samples (``on_policy_batch``:
    ``max_new_tokens``, ``sample_temperature``, ``top_p``, stopping at EOS), from a generator seeded with
    ``seed`` so that two students are scored on draws made the same way. Only the generated tokens
    count. Then ``teacher_perplexity`` is the teacher's perplexity of the student's text (how plausible
    the teacher finds it), ``kl_teacher_student`` is KL(p_T ‖ q_S) along the student's own trajectories
    (what GKD's λ = 1 steps minimise) and ``student_perplexity`` is the student's perplexity of its own
    samples. One sample per prompt, so the numbers carry sampling noise.
    """
    from .onpolicy import on_policy_batch

    generator = torch.Generator(device=next(student.parameters()).device).manual_seed(seed)

    def generated():
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                return
            yield on_policy_batch(student, batch, tokenizer, gen_cfg, generator=generator, vocab_size=vocab_size)

    return {**evaluate(teacher, student, generated(), vocab_size=vocab_size), "seed": seed,
            "max_new_tokens": gen_cfg.max_new_tokens, "sample_temperature": gen_cfg.sample_temperature}


def _sparse_chunk(sums: dict, s_logits: torch.Tensor, targets: TeacherTargets, rows: torch.Tensor,
                  labels: torch.Tensor, vocab_size: int | None) -> None:
    """Metrics against a sparse (top-k + tail) teacher at its recorded temperature: forward KL, agreement
    with the teacher's top-1 id; the teacher's perplexity is unknown. With a sampled tail (``sample_ids``,
    e.g. a version-2 cache) the KL is the exact top-k terms plus the draws' unbiased estimate of the tail
    term (:func:`distillery.losses.sparse.sampled_forward_kl`), which converges to the dense KL over many
    positions; without one it is the KL over the K+1 buckets (top-k + one tail bucket), a lower bound.
    Positions where ``targets.mask`` is False (no teacher row, e.g. an API answer's end-of-turn token)
    count for the student's perplexity only."""
    from .losses import forward_kl

    ids, lp, tail = targets.sparse_rows(rows)
    drawn = targets.sample_rows(rows)  # (s_ids, s_lp) (n, M) or None
    v = vocab_size or s_logits.shape[-1]
    s_lp = torch.log_softmax(s_logits[:, :v], dim=-1)
    sums["s_ce"] += -s_lp.gather(1, labels[:, None]).sum().item()
    sums["tokens"] += rows.numel()
    sums["sparse"] = True
    if targets.mask is not None:
        keep = targets.mask.reshape(-1).to(rows.device)[rows]  # (n,)
        ids, lp, tail, s_logits, s_lp = ids[keep], lp[keep], tail[keep], s_logits[keep], s_lp[keep]
        drawn = None if drawn is None else (drawn[0][keep], drawn[1][keep])
    if ids.shape[0] == 0:
        return
    rows_tt = TeacherTargets(topk_ids=ids[None], topk_logprobs=lp[None], tail_logprob=tail[None],
                             sample_ids=None if drawn is None else drawn[0][None],
                             sample_logprobs=None if drawn is None else drawn[1][None],
                             loss_temperature=targets.loss_temperature)
    sums["kl"] += forward_kl(s_logits[None, :, :v], rows_tt, loss_temperature=targets.loss_temperature).sum().item()
    sums["agree"] += (ids[:, 0].to(s_lp.device) == s_lp.argmax(-1)).sum().item()
    sums["kd_tokens"] += ids.shape[0]


def _exp(x: float) -> float:
    """exp(x), inf past float range (a diverged student's perplexity), instead of OverflowError."""
    return math.exp(x) if x < 709.0 else float("inf")


def strict_json(obj, indent: int | None = 2) -> str:
    """JSON text with every non-finite float written as null: ``json.dumps`` would write a bare ``NaN`` or
    ``Infinity``, which no strict JSON reader accepts."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(obj), indent=indent, allow_nan=False)


def write_json(metrics: dict, path: str | Path) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(strict_json(metrics) + "\n")
    tmp.replace(p)


def run_eval(teacher_src, student_dir: str, data: list[str], *, seq_len: int = 256, batch_size: int = 4,
             max_blocks: int | None = None, json_out: str | None = None, progress: bool = True,
             own_samples: int = 0, prompt_tokens: int = 64, sample_temperature: float = 1.0) -> dict:
    """``distillery eval``: open the teacher, load the student, check their tokenizers, score every held-out block.

    ``teacher_src`` is a source string (a folder, ``.gguf`` file or ``smollm2``: the in-process backend) or a
    whole ``TeacherConfig`` (any ``teacher.kind`` that scores text: ``hf`` or ``served``). Both models run where
    a run would train (:func:`~distillery.teachers.run_device`; ``teacher.device`` may place the teacher
    elsewhere). With ``own_samples`` > 0 the student also continues each block's first ``prompt_tokens`` tokens
    by ``own_samples`` sampled tokens, scored under ``"own_samples"`` (:func:`evaluate_own_samples`, seed 0).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .config import DataConfig, TeacherConfig
    from .data import build_datasets
    from .errors import DistilleryError
    from .students import check_vocab
    from .teachers import open_teacher, run_device, teacher_device

    tcfg = teacher_src if isinstance(teacher_src, TeacherConfig) else TeacherConfig(source=str(teacher_src))
    if tcfg.kind not in ("hf", "served"):
        raise DistilleryError(f"eval scores new text: teacher.kind must be 'hf' or 'served', not '{tcfg.kind}'")
    if own_samples > 0 and prompt_tokens >= seq_len:
        raise DistilleryError(f"--prompt-tokens {prompt_tokens} must be shorter than --seq-len {seq_len}")
    if json_out is not None:  # fail before spending compute if the output cannot be written
        from .checkpoint import ensure_writable_dir

        ensure_writable_dir(Path(json_out).parent if str(Path(json_out).parent) else Path("."), "--json folder")
    sdir = Path(student_dir)
    if not (sdir / "config.json").is_file():
        raise DistilleryError(f"student '{student_dir}' is not a model folder (no config.json)")
    device = run_device()
    teacher = open_teacher(tcfg, teacher_device(tcfg.device, device))
    student = AutoModelForCausalLM.from_pretrained(sdir, dtype=torch.float32).to(device).eval()
    s_tok = AutoTokenizer.from_pretrained(sdir) if (sdir / "tokenizer_config.json").is_file() else teacher.tokenizer
    vocab = check_vocab(teacher.tokenizer, s_tok, teacher.vocab_width, student.get_output_embeddings().weight.shape[0])
    limits = [m.config.max_position_embeddings for m in (teacher.model, student) if m is not None]
    cfg = DataConfig(train=list(data), seq_len=seq_len, val_fraction=0.0, max_train_blocks=max_blocks)
    ds = build_datasets(cfg, teacher.tokenizer, max_positions=min(limits)).train

    def batches():
        return (ds.batch(torch.arange(i, min(i + batch_size, len(ds)))) for i in range(0, len(ds), batch_size))

    metrics = evaluate(teacher, student, batches(), vocab_size=vocab, progress=progress,
                       max_batches=math.ceil(len(ds) / batch_size))
    if own_samples > 0:
        from .config import GenerationConfig

        gen = GenerationConfig(max_new_tokens=own_samples, prompt_tokens=prompt_tokens,
                               sample_temperature=sample_temperature)
        metrics["own_samples"] = evaluate_own_samples(teacher, student, batches(), s_tok, gen, vocab_size=vocab)
    metrics.update({"teacher": tcfg.source if tcfg.kind == "hf" else f"{tcfg.kind}:{tcfg.source}",
                    "student": str(student_dir), "data": list(data), "seq_len": seq_len})
    if json_out is not None:
        write_json(metrics, json_out)
    return metrics
