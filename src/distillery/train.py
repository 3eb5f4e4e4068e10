"""The distillation loop: one function, read top to bottom.

``distill(cfg)`` loads the teacher and the data, builds the student, checks the vocabularies, then
runs ``train.max_steps`` optimizer steps of

    loss = (kd_weight · Σ_t KD(teacher_t ‖ student_t) + ce_weight · Σ_t CE_t) / N_window

where the sums run over the target positions of every micro-batch in the accumulation window (all
ranks) and ``N_window`` is their count, computed once per step (TRL #4719: normalise by the global
token count once, not per micro-batch). The student's LM head and the loss are applied in chunks of
rows (``losses.chunked_distill_loss``), so neither model's ``(B, T, V)`` logits are ever held whole.

Data order is a pure function of (seed, step) (``data.BlockSampler``): micro-batch ``i`` of step ``s``
is global batch ``j = s·A + i`` of the run (``A`` = grad_accum), i.e. batch ``j mod n`` of epoch
``j div n``; rank ``r`` of ``W`` takes the ``r``-th slice of it. A W-process run therefore sees the same
global batches as a one-process run, and resuming needs nothing but the step number (kept in the
checkpoint with the RNG states).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_model
from tqdm.auto import tqdm

from . import fsdp, trackers
from .checkpoint import ensure_writable_dir, list_checkpoints, load_checkpoint, save_checkpoint
from .checkpoint import check_validation, check_weights, usable_checkpoints
from .locks import locked_run
from .run_folder import check_resume, check_run_dir, identity_state
from .config import RunConfig, dump_config
from .data import BlockSampler, block_weights
from .errors import DistilleryError
from .evaluate import evaluate, student_hidden, write_json
from .hardware import auto_precision, return_large_frees, trim_heap
from .losses import chunked_distill_loss
from .losses.unlikelihood import split_repeats, unlikelihood_loss
from .onpolicy import CollapseGuard, choose_on_policy, on_policy_batch
from .run_setup import prepare_run
from .students import sparse_tied_embedding_grad
from .teachers import TeacherUnavailable


class HiddenStates(torch.nn.Module):
    """Wraps a HF causal LM so that DDP's forward returns final hidden states ``(B, T, H)``, not logits."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return student_hidden(self.model, {"input_ids": input_ids, "attention_mask": attention_mask,
                                           "position_ids": position_ids})  # position_ids: packed conversations


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total`` steps."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms, biases (1-D tensors)."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # torch's fused kernel (transformers' Trainer's default): one pass per tensor, no foreach temporaries; on the demo
    # student's 32M parameters 23 ms per step against 130 ms on 2 CPU cores. Plain floating tensors only (FSDP2: foreach).
    params = decay + no_decay
    from torch.distributed.tensor import DTensor
    fused = bool(params) and all(not isinstance(p, DTensor) and p.is_floating_point()
                                 and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.adam_betas), fused=fused or None)


def collate(dataset, indices: torch.Tensor) -> dict:
    """Blocks ``indices`` of ``dataset`` as one batch of ``(B, T)`` tensors."""
    return dataset.batch(indices)


@locked_run  # one run at a time writes train.output_dir (a second one stops, naming the first)
def distill(cfg: RunConfig, resume: bool = False) -> dict:
    """Run the distillation described by ``cfg``; return the final summary (also written to JSON)."""
    tc = cfg.train
    out = Path(tc.output_dir)
    mp = tc.mixed_precision  # 'auto': bf16 autocast where the GPU or CPU runs bf16 fast (hardware.py probes it)
    if mp == "auto":
        mp = auto_precision("cuda" if torch.cuda.is_available() else "cpu")
    frees = tc.return_large_frees if tc.return_large_frees != "auto" else cfg.generation.on_policy_fraction > 0
    if frees:
        return_large_frees()  # freed tensors leave the resident set (hardware.py); process-wide, from here on
    trackers.check_available(tc.report_to)  # a missing tracker package: one line, before anything loads
    acc = Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available(), **trackers.accelerator_kwargs(tc.report_to, out))
    ensure_writable_dir(out, "train.output_dir")
    check_run_dir(out, resume)  # never into an earlier run (without --resume) nor a folder of other files
    identity = identity_state(cfg)  # the settings that shape the trajectory, recorded in every checkpoint
    ckpts = usable_checkpoints(out, warn=acc.is_main_process) if resume else []  # a damaged newest one is skipped
    if ckpts:
        check_resume(ckpts[-1], cfg)  # before anything loads: same settings as the checkpoint, or a one-line error
    run = prepare_run(cfg, device=acc.device, is_main=acc.is_main_process)  # teacher, data, student, vocab
    cfg = run.cfg  # the config in effect (api_logprobs without usable log-probs falls back to CE)
    student, teacher, train_ds = run.student, run.teacher, run.train
    world, rank = acc.num_processes, acc.process_index
    _check_launch(acc)  # say when the launcher did not do what was asked
    global_batch = tc.micro_batch_size * world * tc.grad_accum  # blocks per optimizer step, all ranks
    sampler = BlockSampler(len(train_ds), tc.micro_batch_size, seed=tc.seed, rank=rank, world_size=world,
                           weights=block_weights(train_ds, cfg.data.weights))  # data.weights: a weighted pass
    if len(sampler) == 0:  # with data.weights: the pass's blocks
        raise DistilleryError(f"the training split has {sampler.n} blocks a pass, fewer than one global batch "
                              f"({tc.micro_batch_size * world} = micro_batch_size x processes)")

    use_fsdp = fsdp.fsdp_requested(acc.distributed_type.value, world)
    if use_fsdp:
        fsdp.check_fsdp_recipe(cfg)
    if use_fsdp:  # whole weights go in before sharding; the optimizer is built on the sharded parameters
        if ckpts:
            load_model(student, str(ckpts[-1] / "model.safetensors"))
        wrapped = fsdp.shard(HiddenStates(student), student, acc.device, world)
    if world == 1 and not use_fsdp:  # DDP / FSDP expect a sparse embedding to give sparse gradients
        sparse_tied_embedding_grad(student)  # one (V, H) fewer at the end of backward (students.py)
    optimizer = make_optimizer(student, tc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc.warmup_steps, tc.max_steps, tc.min_lr_ratio))
    gen = torch.Generator().manual_seed(tc.seed + 17 * rank)  # on-policy sampling
    step, tokens_seen = 0, 0
    if ckpts:
        state = load_checkpoint(ckpts[-1], student, optimizer, scheduler, gen, load_weights=not use_fsdp)
        step, tokens_seen = state["step"], state["tokens_seen"]
        # The step number is the data position only while the blocks per step stay the same: a run may
        # resume on another number of processes if micro_batch_size x processes x grad_accum is unchanged.
        if state.get("global_batch", global_batch) != global_batch:
            raise DistilleryError(
                f"{ckpts[-1]} was written with {state['global_batch']} blocks per step, this run takes "
                f"{global_batch} (micro_batch_size {tc.micro_batch_size} x {world} processes x grad_accum "
                f"{tc.grad_accum}): choose train.micro_batch_size so the product is {state['global_batch']}")
        if acc.is_main_process:
            print(f"resuming from {ckpts[-1]} (step {step})")
    if not use_fsdp:
        wrapped, optimizer = acc.prepare(HiddenStates(student), optimizer)
    sharded_root = wrapped if use_fsdp else None  # validation gathers it on every rank
    final_state = None  # under FSDP: the whole weights gathered for the last checkpoint, reused for the student
    head = student.get_output_embeddings()
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml.tmp").write_text(dump_config(cfg))
        os.replace(out / "config.yaml.tmp", out / "config.yaml")
    metrics_path = out / "metrics.jsonl"
    if acc.is_main_process and resume and metrics_path.exists():
        _trim_metrics(metrics_path, step, tc.max_steps)
    log = open(metrics_path, "a") if acc.is_main_process else None
    trackers.start(acc, tc.report_to, cfg, out.name)  # train.report_to: the same records go to TensorBoard, W&B, ...
    lc = cfg.loss
    chunk_rows = lc.chunk_rows(acc.device.type, run.vocab_size)  # 'auto': larger chunks on a GPU
    bar = tqdm(total=tc.max_steps, initial=step, desc="distill", disable=not (tc.progress and acc.is_main_process))
    qat_on = False
    gc = cfg.generation
    guard = CollapseGuard() if gc.on_policy_fraction > 0 and gc.collapse_guard != "off" else None
    t_start, window_tokens, window_from = time.perf_counter(), 0, step
    while step < tc.max_steps:
        if cfg.qat.enabled and not qat_on and step >= tc.max_steps - cfg.qat.last_steps:
            from .quantize import qat_wrap  # fake-quantized weights (STE) for the last steps
            qat_wrap(student, bits=cfg.qat.bits, group_size=cfg.qat.group_size, scheme=cfg.qat.scheme,
                     embedding_bits=cfg.qat.embedding_bits)
            qat_on = True
        micro = [train_ds.batch(sampler.indices(*divmod(step * tc.grad_accum + i, len(sampler))))
                 for i in range(tc.grad_accum)]
        on_policy = (gc.on_policy_fraction > 0 and step >= gc.on_policy_start
                     and choose_on_policy(step, gc.on_policy_fraction, tc.seed))
        if on_policy:  # GKD: the student samples, the teacher scores, the loss is on the samples only
            with acc.autocast():  # sample in the precision the student trains in (bf16 where it is fast)
                micro = [on_policy_batch(student, mb, run.tokenizer, gc, generator=gen,
                                         vocab_size=run.vocab_size) for mb in micro]
            if frees:
                trim_heap()  # the sampler's freed buffers leave the resident set before the teacher and the loss
        ul_labels = [None] * len(micro)  # unlikelihood: the samples' repeated n-grams leave KD/CE for its term
        if on_policy and lc.unlikelihood_weight > 0:
            for i, mb in enumerate(micro):
                mb["labels"], ul_labels[i] = split_repeats(mb["labels"], lc.unlikelihood_ngram)
        n_marked = sum(int((u != -100).sum()) for u in ul_labels if u is not None)
        views = [run.xtok.view(mb) for mb in micro] if run.xtok is not None and lc.kd_weight > 0 else None
        if lc.kd_weight > 0:  # a remote teacher starts scoring now, and the next step's blocks while we compute
            ahead = [v.batch for v in views] if views else micro + _next_blocks(step + 1, tc, gc, train_ds, sampler)
            for mb in ahead:
                teacher.prefetch(mb)
        micro = [{k: v.to(acc.device) for k, v in mb.items()} for mb in micro]
        # N_window: target tokens in the whole accumulation window, summed over ranks, counted once.
        n_tokens = torch.tensor(float(sum(int((mb["labels"] != -100).sum()) for mb in micro) + n_marked),
                                device=acc.device)
        n_tokens = acc.reduce(n_tokens, reduction="sum").item() if world > 1 else n_tokens.item()
        kd_sum = ce_sum = ul_sum = 0.0
        for i, mb in enumerate(micro):
            try:
                t_batch = views[i].batch if views else mb  # another tokenizer: the teacher reads its own tokens
                targets = (teacher.targets(t_batch, vocab_size=run.teacher_vocab).to(acc.device)
                           if lc.kd_weight > 0 else None)
            except TeacherUnavailable as exc:
                raise DistilleryError(f"step {step}: {exc}; the run stopped (last checkpoint: {_last_checkpoint(out)}); "
                                      "once the server is back, rerun with --resume") from None
            if use_fsdp:  # reduce-scatter gradients once per accumulation window
                wrapped.set_requires_gradient_sync(i == len(micro) - 1)
                ctx = contextlib.nullcontext()
            else:
                ctx = acc.no_sync(wrapped) if i < len(micro) - 1 else contextlib.nullcontext()
            with ctx, acc.autocast():
                hidden = wrapped(mb["input_ids"], mb.get("attention_mask"), mb.get("position_ids"))  # (B, T, H)
                folded: dict = {}
                if views:  # cross-tokenizer KD on the aligned positions (xtok.losses), with CE folded in if it can
                    kd_scale = lc.kd_weight * lc.loss_temperature ** 2
                    fold = lc.ce_weight / kd_scale if run.xtok.vmap.student_vocab == run.vocab_size else 0.0
                    kd_tok = run.xtok.loss(hidden, head, targets, views[i], mb["labels"], lc, chunk_rows,
                                           ce_weight=fold, ce_stats=folded)
                    loss = kd_scale * kd_tok / max(n_tokens, 1.0)
                    stats = {"kd_sum": float(kd_tok.detach()) - fold * folded.get("ce_sum", 0.0),
                             "ce_sum": folded.get("ce_sum", 0.0)}
                if not folded:  # the student's CE (and same-vocabulary KD) through the fused head
                    loss_ce, stats_ce = chunked_distill_loss(
                        hidden, head.weight, None if views else targets, mb["labels"], kd=lc.kd, beta=lc.beta,
                        alpha=lc.alpha, loss_temperature=lc.loss_temperature, kd_weight=0.0 if views else lc.kd_weight,
                        ce_weight=lc.ce_weight, n_tokens=max(n_tokens, 1.0), chunk_size=chunk_rows,
                        vocab_size=run.vocab_size, lm_head_bias=head.bias)
                    loss = loss + loss_ce if views else loss_ce
                    stats = dict(stats, ce_sum=stats_ce["ce_sum"]) if views else stats_ce
                if ul_labels[i] is not None:  # Welleck et al.'s sequence-level unlikelihood (losses/unlikelihood.py)
                    ul, _ = unlikelihood_loss(hidden, head.weight, ul_labels[i].to(acc.device), bias=head.bias,
                                              chunk_rows=chunk_rows, vocab_size=run.vocab_size)
                    loss = loss + lc.unlikelihood_weight * ul / max(n_tokens, 1.0)
                    ul_sum += float(ul.detach())
                if not torch.isfinite(loss):
                    raise DistilleryError(f"step {step}: loss is {loss.item()}; stopped before the update "
                                          f"(last good checkpoint: {_last_checkpoint(out)})")
                acc.backward(loss * world)  # DDP averages gradients over ranks; the loss is already global
            kd_sum += stats["kd_sum"]
            ce_sum += stats["ce_sum"]
            window_tokens += int(mb["attention_mask"].sum()) if "attention_mask" in mb else mb["input_ids"].numel()
        grad_norm = None
        if tc.max_grad_norm > 0 and use_fsdp:  # DTensor gradients: torch's clip computes the global norm
            grad_norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), tc.max_grad_norm).full_tensor()
        elif tc.max_grad_norm > 0:
            grad_norm = acc.clip_grad_norm_(wrapped.parameters(), tc.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if frees:
            trim_heap()  # this step's freed heap pages back to the OS before the next one
        step += 1
        tokens_seen += int(n_tokens)
        logging_step = step % tc.log_every == 0 or step == tc.max_steps
        if (logging_step or (on_policy and guard)) and world > 1:  # global sums: every rank's (all ranks call this)
            kd_sum, ce_sum, ul_sum, n_marked = acc.reduce(torch.tensor(
                [kd_sum, ce_sum, ul_sum, n_marked], dtype=torch.float64, device=acc.device), reduction="sum").tolist()
        n_kd = max(n_tokens - n_marked, 1)  # the rows KD and CE read (the repeats went to the unlikelihood term)
        collapsed = guard.update(step, ce_sum / n_kd) if on_policy and guard else None
        if acc.is_main_process and logging_step:
            elapsed = time.perf_counter() - t_start
            kd_scale = lc.kd_weight * lc.loss_temperature ** 2  # the objective scales KD by tau^2 (Hinton)
            rec = {"step": step, "loss": (kd_scale * kd_sum + lc.ce_weight * ce_sum
                                          + lc.unlikelihood_weight * ul_sum) / max(n_tokens, 1),
                   "kd": kd_sum / n_kd, "ce": ce_sum / n_kd,
                   "lr": scheduler.get_last_lr()[0], "grad_norm": None if grad_norm is None else float(grad_norm),
                   "tokens_seen": tokens_seen, "tok_s": window_tokens * world / max(elapsed, 1e-9),
                   "step_s": elapsed / max(step - window_from, 1)}
            if gc.on_policy_fraction > 0:
                rec["on_policy"] = on_policy  # then "ce" is the student's -log q of its own samples
            if on_policy and lc.unlikelihood_weight > 0:  # mean -log(1 - q) over the repeats, and their share
                rec.update(unlikelihood=ul_sum / max(n_marked, 1), repeat_share=n_marked / max(n_tokens, 1))
            log.write(json.dumps(rec) + "\n")
            log.flush()
            trackers.log(acc, tc.report_to, rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tok_s']:.0f}")
            t_start, window_tokens, window_from = time.perf_counter(), 0, step
        bar.update(1)
        if collapsed and gc.collapse_guard == "error":
            raise DistilleryError(f"step {step}: {collapsed} (last checkpoint: {_last_checkpoint(out)})")
        if collapsed:
            if acc.is_main_process:
                print(f"warning: step {step}: {collapsed}", file=sys.stderr)
            guard = None  # warned once (on every rank: the ranks' reductions above stay in step)
        if tc.eval_every and step % tc.eval_every == 0 and step < tc.max_steps and run.val is not None:
            _validate(run, student, step, log, tc, acc, sharded_root)
        if (tc.save_every and step % tc.save_every == 0) or step == tc.max_steps:
            acc.wait_for_everyone()  # under FSDP every rank takes part in gathering the whole state
            gathered = (fsdp.full_model_state(student), fsdp.full_optimizer_state(student, optimizer)) if use_fsdp else None
            if gathered is not None and step == tc.max_steps:
                final_state = gathered[0]
            check_weights(gathered[0] if gathered is not None else student, step, out)  # never save a diverged student
            if acc.is_main_process:
                save_checkpoint(out, step, student, optimizer, scheduler,
                                {"tokens_seen": tokens_seen, "data_step": step, "global_batch": global_batch,
                                 "world_size": world, **identity}, gen, keep=tc.keep_checkpoints, gathered=gathered)
    bar.close()
    if qat_on:
        from .quantize import qat_unwrap
        qat_unwrap(student)
    summary = {"steps": step, "tokens_seen": tokens_seen}
    if run.teacher_stats is not None:
        summary["api_teacher"] = run.teacher_stats
    if run.val is not None:
        summary["validation"] = _validate(run, student, step, log, tc, acc, sharded_root)
    if use_fsdp and final_state is None:  # resumed at the last step: no checkpoint was gathered in this run
        final_state = fsdp.full_model_state(student)
    if acc.is_main_process:
        run.save_student(student if final_state is None else fsdp.plain_copy(student, final_state), out / "student")
        write_json(summary, out / "summary.json")
        log.close()
        trackers.finish(acc, tc.report_to)
    acc.wait_for_everyone()
    if world > 1 and torch.distributed.is_initialized():
        # Tear the process group down before exit: left to interpreter shutdown, gloo's threads were seen
        # to abort a rank ("terminate called without an active exception") under FSDP's device mesh.
        torch.distributed.destroy_process_group()
    return summary


def _next_blocks(step: int, tc, gc, train_ds, sampler) -> list[dict]:
    """The micro-batches step ``step`` will train on, when it is an off-policy step of this run (else none:
    an on-policy step trains on samples not drawn yet). Data order is a pure function of the step."""
    if step >= tc.max_steps or (gc.on_policy_fraction > 0 and step >= gc.on_policy_start
                                and choose_on_policy(step, gc.on_policy_fraction, tc.seed)):
        return []
    return [train_ds.batch(sampler.indices(*divmod(step * tc.grad_accum + i, len(sampler)))) for i in range(tc.grad_accum)]


def _last_checkpoint(out: Path) -> str:
    """The newest checkpoint folder of a run, for a message that stops it ('none' before the first)."""
    ckpts = list_checkpoints(out)
    return str(ckpts[-1]) if ckpts else "none"


def _check_launch(acc: Accelerator) -> None:
    """Two silent launcher fallbacks are pointed out (docs/scale.md)."""
    if not acc.is_main_process:
        return
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and acc.num_processes == 1:
        print("note: an FSDP launch config with one process: nothing to shard, training unsharded", file=sys.stderr)
    if acc.num_processes == 1 and os.environ.get("ACCELERATE_USE_CPU") == "True":
        print("note: one process. `accelerate launch --cpu` starts a single process on one machine; for CPU DDP "
              "use --config_file configs/accelerate/ddp_cpu.yaml (see docs/scale.md)", file=sys.stderr)


def _trim_metrics(path: Path, step: int, max_steps: int) -> None:
    """Keep what a run resuming at ``step`` will not log again: lines up to ``step``, except a final validation
    logged after the last checkpoint (it is redone), and any line a crash cut short. Rewritten atomically."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # torn by a crash or a full disk
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            continue  # a line of another shape: not ours to keep
        if rec["step"] < step or (rec["step"] == step and ("split" not in rec or step < max_steps)):
            kept.append(line)
    path.with_suffix(".tmp").write_text("".join(ln + "\n" for ln in kept))
    os.replace(path.with_suffix(".tmp"), path)


def _validate(run, student, step: int, log, tc, acc, sharded_root=None) -> dict | None:
    """Validation metrics, logged by the main process. Without FSDP only the main process evaluates; with
    FSDP (``sharded_root``) every rank runs the same batches, since each layer's all-gather is a collective."""
    if run.eval_teacher is None or (sharded_root is None and not acc.is_main_process):
        return None
    batches = (collate(run.val, torch.arange(i, min(i + tc.micro_batch_size, len(run.val))))
               for i in range(0, len(run.val), tc.micro_batch_size))
    # eval_batches counts global batches (micro_batch_size x processes blocks), so the validation blocks are
    # the same whatever the number of processes; the main process evaluates them alone. Its (rows, V) logit
    # buffers are bounded by loss.chunk_size like the training loss's (about 7 of them live at once).
    with fsdp.gathered_root(sharded_root):
        if run.xtok is not None:  # another tokenizer: bits per byte, and KL / agreement on aligned positions
            from .xtok.evaluate import evaluate_xtok

            m = evaluate_xtok(run.eval_teacher, student, batches, run.xtok, teacher_vocab=run.teacher_vocab,
                              student_vocab=run.vocab_size, max_batches=tc.eval_batches * acc.num_processes,
                              chunk_rows=min(1024, run.cfg.loss.chunk_rows(acc.device.type, run.vocab_size)))
        else:
            m = evaluate(run.eval_teacher, student, batches, vocab_size=run.vocab_size,
                         max_batches=tc.eval_batches * acc.num_processes, chunk_rows=min(1024, run.cfg.loss.chunk_rows(acc.device.type, run.vocab_size)))
    if not acc.is_main_process:
        return None
    check_validation(m, step, Path(tc.output_dir))  # non-finite validation metrics: diverged
    log.write(json.dumps({"step": step, "split": "val", **m}) + "\n")
    log.flush()
    trackers.log(acc, tc.report_to, {"step": step, "split": "val", **m})
    return m
