"""The GPU lease's two jobs (H100/H200, bf16), each one short run; see BENCHMARKS.md for the rules.

    python benchmarks/gpu.py throughput --tokenizer DIR [--pairs 135m,1.7b] [--steps 25 --warmup 5]
    python benchmarks/gpu.py demo --teacher FILE.gguf --extra-text plays.txt.gz [overrides ...]

``throughput``: tokens/s and peak GPU memory of one KD training step loop, TRL's ``GKDTrainer`` beside
distillery beside the student alone (cross-entropy), the systems of ``benchmarks/kd_systems.py``
(run here with ``device: cuda``), each in its own process, one after the other:

* ``trl_fair``: ``GKDConfig(bf16=True, gradient_checkpointing=False, lmbda=0, beta=0.5)``, the teacher
  loaded in bf16 (what a user does on a GPU); ``trl_defaults``: TRL's defaults (context);
* ``ours_live``: ``distillery.train.distill``, ``loss.kd=jsd, beta=0.5``, mixed_precision auto (bf16
  autocast), teacher dtype auto (bf16);
* ``ours_cached``: the same from a top-32 teacher cache written first (untimed);
* ``student_ce``: the student alone, bf16 autocast, full logits, cross-entropy (the ceiling).

Teachers and students here have **random weights** in the exact shapes named below (the real weights
cannot travel to the GPU machine): a step's arithmetic does not depend on the weights' values.
Pairs: ``135m``: SmolLM2-135M's shape (30 layers, d=576) -> the demo's student (4 layers, d=256);
``1.7b``: SmolLM2-1.7B's shape (24 layers, d=2048, 1.71B) -> SmolLM2-135M's shape. Writes
``<out>/gpu_throughput.json``.

``demo``: the real pair (SmolLM2-135M-Instruct from its GGUF file) distilled on the GPU: the demo recipe
(KD forward KL vs CE, same tokens) at GPU scale: eight plays plus the other Shakespeare plays as extra
training text, seq 512, batch 32, with the held-out and Milton evaluation of ``distillery demo``.
Writes ``<out>/results.json`` (the demo's) and the KD student folder.
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

SYSTEMS_SCRIPT = Path(__file__).resolve().parent / "kd_systems.py"
SYSTEMS = ["trl_fair", "ours_live", "student_ce", "ours_cached", "trl_defaults"]
SMOLLM2_1_7B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                    num_key_value_heads=32, rope_theta=130000.0, max_position_embeddings=8192)
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, rope_theta=100000.0, max_position_embeddings=8192)
DEMO_STUDENT = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=2048)
PAIRS = {"135m": (SMOLLM2_135M, DEMO_STUDENT), "1.7b": (SMOLLM2_1_7B, SMOLLM2_135M)}


def bf16_peak_tflops(n: int = 8192, reps: int = 10) -> float:
    """Best-of-reps bf16 (n, n) @ (n, n) TFLOP/s on this GPU: the MFU denominator, measured not quoted."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t0) / 1e12)
    return best


def setup_pair(name: str, work: Path, tokenizer_dir: str, n_records: int, seq_len: int, device: str = "cuda",
               text: str | None = None) -> dict:
    """Random-weight teacher (bf16) and student (fp32) folders of the pair's shapes, plus chat data."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from distillery.students import count_parameters

    t_shape, s_shape = PAIRS[name]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    base = dict(vocab_size=49152, bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
                rms_norm_eps=1e-5)
    d = work / name
    shutil.rmtree(d, ignore_errors=True)
    models = {}
    t_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for role, shape, dtype, seed in (("teacher", t_shape, t_dtype, 0), ("student", s_shape, torch.float32, 1)):
        torch.manual_seed(seed)
        with torch.device(device):  # random init on the GPU: seconds, not minutes, for 1.7B weights
            model = LlamaForCausalLM(LlamaConfig(**base, **shape)).to(dtype)
        model.save_pretrained(d / role, safe_serialization=True)
        tok.save_pretrained(d / role)
        models[role] = {"shape": shape, "parameters": count_parameters(model),
                        "matmul_parameters": common.matmul_params(model), "dtype": str(dtype)}
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    data = d / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in common.chat_records(tok, n_records, seq_len, text=text)))
    return {"teacher_source": str(d / "teacher"), "teacher_dir": str(d / "teacher"), "student_dir": str(d / "student"),
            "data": str(data), "models": models}


def run_throughput(args) -> dict:
    import torch

    work, log = Path(args.work_dir), Path(args.work_dir) / "children.log"
    cuda = args.device == "cuda"  # --device cpu: a smoke run of this script where no GPU is (fp32)
    peak = bf16_peak_tflops() if cuda else common.matmul_peak_gflops(args.threads) / 1e3
    report = {"benchmark": "gpu_throughput", "machine": {**common.machine_info(threads=args.threads),
                                                        "gpu": torch.cuda.get_device_name(0) if cuda else None,
                                                        "torch": torch.__version__, "cuda": torch.version.cuda},
              "matmul_peak_tflops": peak, "device": args.device,
              "settings": {"batch": args.batch, "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup,
                           "loss": "JSD beta=0.5 (TRL: generalized_jsd_loss, lmbda=0), bf16 autocast, fp32 master weights",
                           "rounds": 1, "tokens": "all tokens processed (batch x seq_len, no padding)"},
              "limits": "random weights in the named shapes; one round per system (GPU timings vary little, but "
                        "this is one run); peak GPU memory = torch.cuda.max_memory_allocated of the child",
              "pairs": {}}
    text = None  # the bundled eight plays, plus --text (more plays) when records need more tokens
    if args.text:
        import gzip

        text = common.corpus() + "\n\n" + gzip.open(args.text, "rt", encoding="utf-8").read()
    for name in args.pairs.split(","):
        print(f"[{name}] setting up random-weight models and data", flush=True)
        pair = setup_pair(name, work, args.tokenizer, n_records=args.batch * args.steps, seq_len=args.seq_len,
                          device=args.device, text=text)
        base = {k: pair[k] for k in ("teacher_source", "teacher_dir", "student_dir", "data")}
        base.update(seq_len=args.seq_len, batch=args.batch, threads=args.threads, device=args.device,
                    cache_dir=str(work / name / "cache"))
        systems = args.systems.split(",")
        if name == "1.7b" and "trl_defaults" in systems and not args.big_defaults:
            systems.remove("trl_defaults")
        if "ours_cached" in systems:
            pair["cache_write"] = common.run_child(SYSTEMS_SCRIPT, {**base, "system": "cache", "steps": args.steps,
                                                   "out_dir": str(work / name / "cache_run")},
                                                   threads=args.threads, log=log, timeout=args.child_timeout)
            print(f"[{name}] cache write: {pair['cache_write']}", flush=True)
        runs = {}
        for system in systems:
            spec = {**base, "system": system, "config": "fair" if system == "trl_fair" else "defaults",
                    "steps": args.steps, "out_dir": str(work / name / f"run-{system}")}
            r = common.run_child(SYSTEMS_SCRIPT, spec, threads=args.threads, log=log, timeout=args.child_timeout)
            if "error" not in r:
                r["steady_tok_s"] = common.steady_tok_s(r["step_seconds"], r["tokens_per_step"], args.warmup)
                n_s, n_t = (pair["models"][k]["matmul_parameters"] for k in ("student", "teacher"))
                flops = 6 * n_s + (2 * n_t if system in ("trl_fair", "trl_defaults", "ours_live") else 0)
                r["mfu"] = r["steady_tok_s"] * flops / (peak * 1e12) if r["steady_tok_s"] else None
            runs[system] = r
            shown = (f"{r['steady_tok_s']:.0f} tok/s, peak GPU {r.get('peak_gpu_bytes', 0) / 1e9:.1f} GB"
                     if "error" not in r else r["error"])
            print(f"[{name}] {system:<14} {shown}", flush=True)
            report["pairs"][name] = {**pair, "runs": runs, "partial": True}
            common.write_json(report, Path(args.out))  # kept if a later system runs past the lease
        ok = {s: r for s, r in runs.items() if "error" not in r}

        def ratio(a, b, key):
            return common.ratio(ok.get(a, {}).get(key), ok.get(b, {}).get(key))

        pair["runs"] = runs
        pair["ratios"] = {"ours_live/trl_fair tok_s": ratio("ours_live", "trl_fair", "steady_tok_s"),
                          "ours_live/trl_fair peak_gpu": ratio("ours_live", "trl_fair", "peak_gpu_bytes"),
                          "ours_live/trl_defaults tok_s": ratio("ours_live", "trl_defaults", "steady_tok_s"),
                          "ours_live/trl_defaults peak_gpu": ratio("ours_live", "trl_defaults", "peak_gpu_bytes"),
                          "ours_cached/student_ce tok_s": ratio("ours_cached", "student_ce", "steady_tok_s"),
                          "ours_cached/trl_fair tok_s": ratio("ours_cached", "trl_fair", "steady_tok_s"),
                          "ours_live/student_ce tok_s": ratio("ours_live", "student_ce", "steady_tok_s")}
        for k, v in pair["ratios"].items():
            if v is not None:
                print(f"[{name}] {k:<34} {v:.2f}", flush=True)
        report["pairs"][name] = pair
        shutil.rmtree(work / name, ignore_errors=True)
    return report


def run_gpu_demo(args) -> dict:
    """The demo recipe at GPU scale on the real teacher; the KD student comes back for device checks."""
    from distillery.demo import run_demo

    overrides = [f"teacher.source={args.teacher}", "data.seq_len=512", "train.micro_batch_size=32",
                 f"train.max_steps={args.demo_steps}", "train.warmup_steps=30", "train.save_every=0",
                 "data.max_val_blocks=64", "train.eval_batches=4", "train.progress=false"]
    if args.extra_text:
        overrides.append(f'data.train=["demo:shakespeare","{args.extra_text}"]')
    return run_demo(quick=False, output_dir=args.out_dir, overrides=overrides + list(args.overrides))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="job", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--tokenizer", required=True, help="a folder with SmolLM2's tokenizer (chat template included)")
    t.add_argument("--pairs", default="135m,1.7b")
    t.add_argument("--systems", default=",".join(SYSTEMS))
    t.add_argument("--big-defaults", action="store_true", help="also TRL's defaults on the 1.7b pair")
    t.add_argument("--steps", type=int, default=25)
    t.add_argument("--warmup", type=int, default=5)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--seq-len", type=int, default=1024)
    t.add_argument("--threads", type=int, default=8, help="CPU threads per child (data, Python)")
    t.add_argument("--child-timeout", type=float, default=240)
    t.add_argument("--work-dir", default="/tmp/distillery-gpu")
    t.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    t.add_argument("--text", default=None, help="a .txt.gz of more training text for the chat records")
    t.add_argument("--out", default="benchmarks/results/gpu_throughput.json")
    d = sub.add_parser("demo")
    d.add_argument("--teacher", required=True, help="SmolLM2-135M-Instruct GGUF file")
    d.add_argument("--extra-text", default=None, help="more training text (the other Shakespeare plays)")
    d.add_argument("--demo-steps", type=int, default=300)
    d.add_argument("--out-dir", default="runs/gpu-demo")
    d.add_argument("overrides", nargs="*", default=[])
    args = ap.parse_args()
    if args.job == "throughput":
        report = run_throughput(args)
        common.write_json(report, Path(args.out))
        print(f"wrote {args.out}")
    else:
        run_gpu_demo(args)


if __name__ == "__main__":
    main()
