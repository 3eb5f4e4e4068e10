"""Overlap of a served teacher with training: does the trainer wait for the server?

The real llama.cpp server (llama-cpp-python, SmolLM2-135M-Instruct Q4_1, ``--logits_all``) runs pinned to one
core, the trainer (the demo student, 15.8M) to the other, one thread each. Measured in one run:

* ``server``: the server's scoring throughput alone: ``ServedTeacher.targets`` on the training blocks, one
  micro-batch after another, nothing else running (tokens scored per second);
* ``student``: the student's training step alone: the same recipe from a teacher cache written by that server
  (the targets are read from disk, so the step is the student's own work);
* ``served``: training with ``teacher.kind: served`` and ``teacher.prefetch`` 2 (the next micro-batches are
  scored while the student computes), and with ``prefetch`` 0 (scored on demand) for comparison.

Goal (issue 21): served tok/s >= 0.8 x min(student, server). Steady state = median step after the first 2.

Then the quality check: ``--kl-steps`` steps off-policy and on-policy (lambda = 1) with the served teacher and
with the in-process teacher (the same GGUF dequantized), both students scored afterwards against the in-process
teacher on the same held-out blocks: held-out KL within 2% (issue 21).

    .venv/bin/python benchmarks/served.py [--steps 12] [--batch 4] [--seq-len 128] [--out benchmarks/results/served.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine_info, write_json  # noqa: E402


def _recipe(root: Path, name: str, teacher: dict, args) -> Path:
    import yaml

    from distillery.config import load_config

    base = load_config(str(Path(__file__).resolve().parents[1] / "configs/smollm2_student.yaml"))  # the 15.8M student
    rec = base.model_dump(mode="json")
    rec["teacher"] = {**rec["teacher"], **teacher}
    rec["data"].update(seq_len=args.seq_len, max_train_blocks=args.batch * args.steps, max_val_blocks=None,
                       val_fraction=0.0)
    rec["train"].update(output_dir=str(root / name), max_steps=args.steps, micro_batch_size=args.batch,
                        grad_accum=1, eval_every=0, save_every=0, progress=False, warmup_steps=2)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(rec))
    return path


def _steady(run: Path) -> float:
    tok = [json.loads(x)["tok_s"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"tok_s"' in x]
    return statistics.median(tok[2:]) if len(tok) > 2 else statistics.median(tok)


def _quality(root: Path, served: dict, args) -> dict:
    """Held-out KL (against the in-process teacher) of students trained with the served and the in-process teacher."""
    import torch

    from distillery.config import load_config
    from distillery.evaluate import evaluate
    from distillery.teachers import load_teacher
    from distillery.train import distill
    from transformers import AutoModelForCausalLM

    live = load_teacher("smollm2", dtype="float32")
    res = {}
    for policy, frac in (("off_policy", 0.0), ("on_policy", 1.0)):
        for name, teacher in (("in_process", {"kind": "hf", "dtype": "float32"}), ("served", {**served, "prefetch": 2})):
            run = f"kl_{policy}_{name}"
            cfg = load_config(_recipe(root, run, teacher, args),
                              [f"train.max_steps={args.kl_steps}", f"generation.on_policy_fraction={frac}",
                               "generation.max_new_tokens=32", "generation.prompt_tokens=32",
                               "generation.collapse_guard=warn", "data.val_fraction=0.05", "data.max_val_blocks=8",
                               f"data.max_train_blocks={args.batch * args.kl_steps}"])
            distill(cfg)
            student = AutoModelForCausalLM.from_pretrained(str(root / run / "student")).eval()
            from distillery.data import build_datasets

            val = build_datasets(cfg.data, live.tokenizer).val
            batches = (val.batch(torch.arange(i, min(i + 4, len(val)))) for i in range(0, len(val), 4))
            res[f"{policy}_{name}"] = evaluate(live, student, batches, vocab_size=len(live.tokenizer))["kl_teacher_student"]
            print(f"{run}: held-out KL {res[f'{policy}_{name}']:.4f}", flush=True)
        a, b = res[f"{policy}_in_process"], res[f"{policy}_served"]
        res[f"{policy}_relative_difference"] = (b - a) / a
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--kl-steps", type=int, default=30, help="steps of the served-vs-in-process quality runs (0: skip)")
    ap.add_argument("--out", default=str(RESULTS / "served.json"))
    args = ap.parse_args()

    import torch

    os.sched_setaffinity(0, {0})  # the trainer on core 0, the server on core 1
    torch.set_num_threads(1)
    from distillery.api.local_server import llamacpp_server, smollm2_gguf
    from distillery.config import load_config
    from distillery.train import distill

    root = Path(tempfile.mkdtemp(prefix="served-bench-"))
    out: dict = {"machine": machine_info(threads=1), "steps": args.steps, "micro_batch": args.batch,
                 "seq_len": args.seq_len, "server": "llama-cpp-python (SmolLM2-135M-Instruct Q4_1, --logits_all), core 1",
                 "trainer": "the 15.8M student of configs/smollm2_student.yaml, core 0, 1 thread"}
    with llamacpp_server(smollm2_gguf(), n_ctx=2 * args.seq_len + 8, logits_all=True, cpus={1}) as url:
        served = {"kind": "served", "base_urls": [url], "engine": "llamacpp", "top_logprobs": 20, "concurrency": 2}
        # 1. the server alone
        from distillery.data import build_datasets
        from distillery.teachers import open_teacher

        cfg = load_config(_recipe(root, "probe", {**served, "prefetch": 0}, args))
        teacher = open_teacher(cfg.teacher)
        ds = build_datasets(cfg.data, teacher.tokenizer).train
        t0, n = time.perf_counter(), 0
        for s in range(min(args.steps, 6)):
            b = ds.batch(torch.arange(s * args.batch, (s + 1) * args.batch))
            teacher.targets(b)
            n += int(b["attention_mask"].sum())
        out["server_tok_s"] = n / (time.perf_counter() - t0)
        print(f"server alone: {out['server_tok_s']:.0f} tok/s", flush=True)
        # 2. the student alone: from a cache the server wrote
        from distillery.cache.command import run_cache

        run_cache(load_config(_recipe(root, "cachewrite", {**served, "prefetch": 2}, args)), str(root / "cache"),
                  batch_size=args.batch, progress=False)
        distill(load_config(_recipe(root, "student", {"kind": "cache", "cache_path": str(root / "cache")}, args)))
        out["student_tok_s"] = _steady(root / "student")
        print(f"student alone: {out['student_tok_s']:.0f} tok/s", flush=True)
        # 3. training against the server, with and without prefetch
        for depth in (2, 0):
            name = f"served_prefetch{depth}"
            distill(load_config(_recipe(root, name, {**served, "prefetch": depth}, args)))
            out[f"{name}_tok_s"] = _steady(root / name)
            print(f"{name}: {out[f'{name}_tok_s']:.0f} tok/s", flush=True)
        if args.kl_steps:
            out["held_out_kl"] = _quality(root, served, args)
    bound = min(out["student_tok_s"], out["server_tok_s"])
    out["bound_tok_s"] = bound
    out["ratio_prefetch2_to_bound"] = out["served_prefetch2_tok_s"] / bound
    out["ratio_prefetch0_to_bound"] = out["served_prefetch0_tok_s"] / bound
    out["goal"] = "served tok/s >= 0.8 x min(student alone, server alone)"
    write_json(out, Path(args.out))
    print(json.dumps({k: v for k, v in out.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
