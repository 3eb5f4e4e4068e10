"""One cross-tokenizer training run per process, for ``benchmarks/cross_tokenizer.py``.

    python benchmarks/xtok_systems.py --child SPEC.json --result OUT.json   (run by common.run_child)

``SPEC["system"]``: ``ours`` (``distillery.train.distill`` on a recipe the parent wrote: CE, sequence-level KD or
cross-tokenizer KD; ``SPEC["xtok_fused"] = False`` runs the loss's reference path instead of :mod:`distillery.xtok.fused`) or ``gold_trl`` (TRL's ``trl.experimental.gold.GOLDTrainer`` on the same student init, blocks,
steps, optimizer and schedule). Both save the trained student to ``SPEC["out_dir"]/student`` and report per-step
seconds, student tokens per step, losses and the process's peak RSS (``VmHWM``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def child_ours(spec: dict) -> dict:
    from distillery.config import RunConfig
    from distillery.train import distill

    if spec.get("xtok_fused") is False:  # the reference path (autograd per chunk, checkpointed): the pre-fusion loss
        from distillery.xtok import losses

        losses.xtok_loss.__kwdefaults__["fused"] = False
    recipe = spec["recipe"]
    distill(RunConfig.model_validate(recipe))
    out = Path(recipe["train"]["output_dir"])
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln]
    steps = [r for r in recs if "tok_s" in r]
    per_step = recipe["train"]["micro_batch_size"] * recipe["data"]["seq_len"]  # packed blocks: no padding
    val = [r for r in recs if r.get("split") == "val"]
    return {"step_seconds": [per_step / r["tok_s"] for r in steps], "tokens_per_step": per_step,
            "losses": [r["loss"] for r in steps], "kd": [r["kd"] for r in steps], "ce": [r["ce"] for r in steps],
            "final_val": val[-1] if val else None, "student_dir": str(out / "student")}


def gold_records(spec: dict, tok) -> list[dict]:
    """GOLD's data: each of our training blocks (the same blocks ``ours`` trains on) as a plain-text
    prompt/completion pair, prompt = the block's first student token, completion = the rest (GOLD trains on the
    completion only and needs a non-empty prompt to start from)."""
    import torch

    from distillery.config import DataConfig
    from distillery.data import build_datasets

    data = DataConfig.model_validate(spec["recipe"]["data"])
    train = build_datasets(data, tok, progress=False).train
    blocks = train.batch(torch.arange(len(train)))
    out = []
    for ids, last in zip(blocks["input_ids"].tolist(), blocks["labels"][:, -1].tolist()):
        ids = ids + ([last] if last != -100 else [])
        out.append({"prompt": tok.decode(ids[:1]), "completion": tok.decode(ids[1:])})
    return out


def child_gold(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gold import GOLDConfig, GOLDTrainer
    from trl.experimental.utils import DataCollatorForChatML

    from distillery.config import TrainConfig
    from distillery.train import lr_lambda, make_optimizer

    r = spec["recipe"]
    tc = TrainConfig.model_validate(r["train"])
    bf16 = r["train"]["mixed_precision"] == "bf16"
    tok = AutoTokenizer.from_pretrained(spec["student_init"])
    student = AutoModelForCausalLM.from_pretrained(spec["student_init"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher_dir"], dtype=torch.bfloat16 if bf16 else torch.float32)
    records = gold_records(spec, tok)
    seq = r["data"]["seq_len"]
    inner = DataCollatorForChatML(tokenizer=tok, max_length=seq + 8)  # what GOLDTrainer builds itself
    counted: list[int] = []

    def collate(examples):
        batch = inner(examples)
        counted.append(int(batch["attention_mask"].sum()))
        return batch

    args = GOLDConfig(
        output_dir=tempfile.mkdtemp(prefix="gold-"), use_cpu=True, bf16=bf16, gradient_checkpointing=False,
        lmbda=0.0,  # off-policy, like ours: the data's text, no student samples
        beta=0.5, use_uld_loss=True, use_extended_uld=True, uld_use_hybrid_loss=True,  # GOLD: JSD matched + ULD rest
        uld_crossentropy_weight=spec["ce_weight"], uld_distillation_weight=1.0,
        teacher_tokenizer_name_or_path=spec["teacher_dir"], per_device_train_batch_size=tc.micro_batch_size,
        max_steps=tc.max_steps, max_length=seq + 8, max_completion_length=8, learning_rate=tc.lr,
        max_grad_norm=tc.max_grad_norm, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        seed=tc.seed, dataloader_drop_last=True)
    # the same AdamW (betas, decay groups) and warm-up + cosine schedule as distillery's loop
    opt = make_optimizer(student, tc)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc.warmup_steps, tc.max_steps, tc.min_lr_ratio))
    clock = common.trainer_clock()
    trainer = GOLDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(records),
                          processing_class=tok, data_collator=collate, callbacks=[clock], optimizers=(opt, sched))
    trainer.train()
    shutil.rmtree(args.output_dir, ignore_errors=True)
    folder = Path(spec["out_dir"]) / "student"
    trainer.model.save_pretrained(folder)
    tok.save_pretrained(folder)
    t = clock.ticks
    return {"step_seconds": [b - a for a, b in zip(t, t[1:])], "tokens_per_step": sum(counted) // max(len(counted), 1),
            "losses": clock.losses, "student_dir": str(folder), "examples": len(records),
            "trl_settings": {"bf16": args.bf16, "gradient_checkpointing": args.gradient_checkpointing,
                             "lmbda": args.lmbda, "beta": args.beta, "use_uld_loss": args.use_uld_loss,
                             "uld_use_hybrid_loss": args.uld_use_hybrid_loss, "use_extended_uld": args.use_extended_uld,
                             "uld_crossentropy_weight": args.uld_crossentropy_weight, "learning_rate": args.learning_rate}}


def child_main(spec_path: str, result_path: str) -> None:
    import torch

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    Path(spec["out_dir"]).mkdir(parents=True, exist_ok=True)
    result = {"ours": child_ours, "gold_trl": child_gold}[spec["system"]](spec)
    result["peak_rss_bytes"] = common.peak_rss_bytes()
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", required=True, help="the spec JSON written by common.run_child")
    ap.add_argument("--result", required=True)
    a = ap.parse_args()
    child_main(a.child, a.result)
