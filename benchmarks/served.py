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

    base = load_config(str(Path(__file__).resolve().parents[1] / "src/distillery/configs/demo.yaml"))
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
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
                 "trainer": "demo student 15.8M, core 0, 1 thread"}
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
    bound = min(out["student_tok_s"], out["server_tok_s"])
    out["bound_tok_s"] = bound
    out["ratio_prefetch2_to_bound"] = out["served_prefetch2_tok_s"] / bound
    out["ratio_prefetch0_to_bound"] = out["served_prefetch0_tok_s"] / bound
    out["goal"] = "served tok/s >= 0.8 x min(student alone, server alone)"
    write_json(out, Path(args.out))
    print(json.dumps({k: v for k, v in out.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
