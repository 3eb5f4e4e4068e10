"""One KD training system per process, for ``benchmarks/throughput.py`` and ``benchmarks/gpu.py``.

    python benchmarks/kd_systems.py --child SPEC.json --result OUT.json   (run by common.run_child)

``SPEC["system"]`` picks the system: ``ours_live`` / ``ours_cached`` (``distillery.train.distill``),
``trl_fair`` / ``trl_defaults`` (TRL's ``GKDTrainer``), ``student_ce`` (the student alone, cross-entropy)
or ``cache`` (write the teacher cache the cached system reads). ``SPEC["device"] == "cuda"`` runs it on
the GPU; otherwise on the CPU. Each runs in bf16 autocast with the teacher stored in bf16 where the device runs bf16
fast (``distillery.hardware.auto_precision``: GPUs that have it, CPUs that pass the bf16 probe), else in fp32. The result holds
the per-step seconds, tokens per step, losses, peak RSS and (on a GPU) peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

LR = 1e-4


def ours_config(spec: dict, cached: bool) -> dict:
    from distillery.hardware import auto_precision

    bf16 = auto_precision(spec.get("device", "cpu")) == "bf16"  # what `auto` picks here (the CPU probe on a CPU)
    teacher = ({"kind": "cache", "cache_path": spec["cache_dir"]} if cached
               else {"kind": "hf", "source": spec["teacher_source"], "dtype": "bfloat16" if bf16 else "float32"})
    return {"teacher": teacher, "student": {"init": "pretrained", "pretrained": spec["student_dir"]},
            "data": {"train": [spec["data"]], "format": "chat", "seq_len": spec["seq_len"], "val_fraction": 0.0},
            "loss": {"kd": "jsd", "beta": 0.5, "kd_weight": 1.0, "ce_weight": 0.0},
            "train": {"output_dir": spec["out_dir"], "max_steps": spec["steps"], "micro_batch_size": spec["batch"],
                      "lr": LR, "warmup_steps": 0, "eval_every": 0, "save_every": 0, "log_every": 1, "progress": False}}


def child_ours(spec: dict) -> dict:
    from distillery.config import RunConfig
    from distillery.train import distill

    distill(RunConfig.model_validate(ours_config(spec, spec["system"] == "ours_cached")))
    recs = [json.loads(ln) for ln in (Path(spec["out_dir"]) / "metrics.jsonl").read_text().splitlines() if ln]
    steps = [r for r in recs if "tok_s" in r]
    per_step = spec["batch"] * spec["seq_len"]  # metrics' tok_s counts attention-mask tokens: no padding here
    return {"step_seconds": [per_step / r["tok_s"] for r in steps], "tokens_per_step": per_step,
            "metrics_tok_s": [r["tok_s"] for r in steps], "losses": [r["loss"] for r in steps]}


def child_trl(spec: dict) -> dict:
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer
    from trl.experimental.utils import DataCollatorForChatML

    from distillery.hardware import auto_precision

    cuda = spec.get("device") == "cuda"  # benchmarks/gpu.py
    # bf16 autocast and a bf16 teacher where the device runs bf16 fast (a GPU; a CPU that passes the probe): TRL's
    # fastest fair setting there, and the precision distillery's `auto` picks
    bf16 = auto_precision("cuda" if cuda else "cpu") == "bf16"
    tok = AutoTokenizer.from_pretrained(spec["student_dir"])
    student = AutoModelForCausalLM.from_pretrained(spec["student_dir"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher_dir"], dtype=torch.bfloat16 if bf16 else torch.float32)
    records = [json.loads(ln) for ln in Path(spec["data"]).read_text().splitlines()]
    inner = DataCollatorForChatML(tokenizer=tok, max_length=spec["seq_len"])  # what GKDTrainer builds itself
    counted: list[int] = []

    def collate(examples):
        batch = inner(examples)
        counted.append(int(batch["attention_mask"].sum()))
        return batch

    # fair: no activation checkpointing (memory is not short here), bf16 autocast only where it is fast (GPU)
    extra = {"bf16": bf16, "gradient_checkpointing": False} if spec["config"] == "fair" else {}
    args = GKDConfig(output_dir=tempfile.mkdtemp(prefix="gkd-"), use_cpu=not cuda, lmbda=0.0, beta=0.5,
                     per_device_train_batch_size=spec["batch"], max_steps=spec["steps"], max_length=spec["seq_len"],
                     learning_rate=LR, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
                     seed=0, **extra)
    clock = common.trainer_clock(cuda)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(records),
                         processing_class=tok, data_collator=collate, callbacks=[clock])
    trainer.train()
    shutil.rmtree(args.output_dir, ignore_errors=True)
    t = clock.ticks
    return {"step_seconds": [b - a for a, b in zip(t, t[1:])], "tokens_per_step": sum(counted) // max(len(counted), 1),
            "collated_tokens": sorted(set(counted)), "losses": clock.losses,
            "trl_settings": {"bf16": args.bf16, "gradient_checkpointing": args.gradient_checkpointing,
                             "activation_checkpointing": getattr(args, "activation_checkpointing", None),
                             "optim": str(args.optim), "lmbda": args.lmbda, "beta": args.beta}}


def child_ce(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillery.config import DataConfig
    from distillery.data import build_datasets
    from distillery.train import make_optimizer
    from distillery.config import TrainConfig

    tok = AutoTokenizer.from_pretrained(spec["student_dir"])
    ds = build_datasets(DataConfig(train=[spec["data"]], format="chat", seq_len=spec["seq_len"], val_fraction=0.0),
                        tok, progress=False).train
    from distillery.hardware import auto_precision

    dev = torch.device("cuda" if spec.get("device") == "cuda" else "cpu")
    bf16 = auto_precision(dev) == "bf16"
    model = AutoModelForCausalLM.from_pretrained(spec["student_dir"], dtype=torch.float32).to(dev).train()
    opt = make_optimizer(model, TrainConfig(lr=LR))
    times, losses = [], []
    for step in range(spec["steps"]):
        t0 = time.perf_counter()
        b = {k: v.to(dev) for k, v in ds.batch(torch.arange(step * spec["batch"], (step + 1) * spec["batch"]) % len(ds)).items()}
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):  # the precision `auto` picks here
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), b["labels"].flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # .item() waits for the GPU: the step time below is complete
        times.append(time.perf_counter() - t0)
    return {"step_seconds": times, "tokens_per_step": spec["batch"] * spec["seq_len"], "losses": losses}


def child_cache(spec: dict) -> dict:
    from distillery.cache import run_cache
    from distillery.config import RunConfig

    t0 = time.perf_counter()
    run_cache(RunConfig.model_validate(ours_config(spec, cached=False)), spec["cache_dir"], k=32, progress=False)
    return {"seconds": time.perf_counter() - t0}


def child_main(spec_path: str, result_path: str) -> None:
    import torch

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    fn = {"ours_live": child_ours, "ours_cached": child_ours, "trl_fair": child_trl, "trl_defaults": child_trl,
          "student_ce": child_ce, "cache": child_cache}[spec["system"]]
    result = fn(spec)
    result["peak_rss_bytes"] = common.peak_rss_bytes()
    if torch.cuda.is_available():
        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", required=True, help="the spec JSON written by common.run_child")
    ap.add_argument("--result", required=True)
    a = ap.parse_args()
    child_main(a.child, a.result)
