"""Throughput of one KD training loop: TRL's GKD trainer vs distillery (live and cached teacher) vs the
student alone (cross-entropy, the ceiling a cached teacher can approach).

    .venv/bin/python benchmarks/throughput.py [--quick] [--pair tiny|real|both] [--rounds 2] [--threads 2]

Each system runs in ``benchmarks/kd_systems.py``. Every system trains the same student from the same
saved weights, with the same teacher, on the same chat blocks (each conversation renders to exactly ``seq_len`` tokens, so no padding), batch 8 x 256,
in the precision ``auto`` picks on this machine (bf16 autocast and a bf16 teacher where ``distillery.hardware``
finds bf16 fast, else fp32; TRL's fair configuration follows it), for the same number of optimizer steps, each in
its own process, alternated A B A B:

* ``trl_defaults``: ``GKDTrainer`` with ``GKDConfig(use_cpu=True, lmbda=0, beta=0.5)`` and TRL's defaults
  (``bf16=True``, ``gradient_checkpointing=True``); fewer steps, context only (skipped for the real pair
  unless ``--real-defaults``: ~10x slower there);
* ``trl_fair``: the same with ``gradient_checkpointing=False`` and ``bf16`` only where the probe finds it fast:
  every headline ratio is to this;
* ``ours_live``: ``distillery.train.distill`` (the product's loop) with ``loss.kd=jsd, beta=0.5``;
  tokens/s from its own ``metrics.jsonl``;
* ``ours_cached``: the same from a top-32 teacher cache written first (``distillery.cache``, untimed);
* ``student_ce``: a plain PyTorch loop of the student alone (full logits, cross-entropy, same AdamW).

Each runs once more with PyTorch's ``THP_MEM_ALLOC_ENABLE=1`` (suffix ``+thp``, not for trl_defaults).
Reported per system: steady-state tokens/s (all tokens processed, after ``--warmup`` steps), peak RSS
(``VmHWM`` of the child) and MFU = tok/s x FLOPs/token / the matmul peak measured here (fp32,
``--threads`` threads). FLOPs/token = 6 N_student + 2 N_teacher for systems that run the teacher,
6 N_student for the others; N counts the weights used in matmuls (input embedding tables excluded,
LM head included; attention's sequence-length term ignored). Pairs:

* ``tiny``: teacher Llama 6 layers d=384 (13.8M), student 3 layers d=192 (2.9M), random init, a 4,096
  BPE vocabulary trained on the bundled Shakespeare;
* ``real``: SmolLM2-135M-Instruct (``load_teacher('smollm2')``) and the demo's 4-layer d=256 tied
  student (~16M, vocab 49,152).

Writes ``benchmarks/results/throughput.json`` (``throughput_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from kd_systems import LR, ours_config  # noqa: E402

SYSTEMS_SCRIPT = Path(__file__).resolve().parent / "kd_systems.py"  # each system runs there, in its own process

SYSTEMS = ["trl_defaults", "trl_fair", "ours_live", "ours_cached", "student_ce"]
THP = {"THP_MEM_ALLOC_ENABLE": "1"}
SIZES = {  # steps, warm-up steps skipped, steps for trl_defaults (and its warm-up)
    "tiny": {"full": (30, 5, 8, 2), "quick": (8, 3, 4, 2)},
    "real": {"full": (12, 3, 4, 1), "quick": (4, 2, 3, 1)},
}
GOALS = {"tiny": (1.2, 0.7), "real": (3.0, 0.3)}  # ours_live vs trl_fair: >= x tok/s at <= y RSS
CACHED_GOAL = 0.8  # ours_cached >= 0.8 x student_ce tok/s


# ----------------------------------------------------------------------------- setup (parent, untimed)
def setup_pair(pair: str, work: Path, n_records: int, seq_len: int, prompt_tokens: int = 64) -> dict:
    """Save teacher (tiny) and student folders with the tokenizer, write the chat JSONL (user turns of
    ``prompt_tokens`` tokens), check the data. ``benchmarks/onpolicy.py`` builds its pairs here too."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from distillery.students import count_parameters, student_config

    d = work / pair
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    if pair == "tiny":
        tok = common.train_bpe_tokenizer(4096)
        ids = dict(vocab_size=4096, bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                   max_position_embeddings=1024, tie_word_embeddings=False)
        torch.manual_seed(0)
        teacher = LlamaForCausalLM(LlamaConfig(hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                                               num_attention_heads=6, num_key_value_heads=6, **ids))
        teacher_dir, teacher_source = d / "teacher", str(d / "teacher")
        teacher.save_pretrained(teacher_dir, safe_serialization=True)
        tok.save_pretrained(teacher_dir)
        s_cfg = LlamaConfig(hidden_size=192, intermediate_size=512, num_hidden_layers=3, num_attention_heads=3,
                            num_key_value_heads=3, **ids)
    else:
        from distillery.teachers.hf import resolve_source

        teacher_dir, teacher_source = Path(resolve_source("smollm2")[0]), "smollm2"
        tok = AutoTokenizer.from_pretrained(teacher_dir)
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
        s_cfg = student_config(dict(model_type="llama", hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                    tie_word_embeddings=True), AutoConfig.from_pretrained(teacher_dir))
    torch.manual_seed(1)
    student = AutoModelForCausalLM.from_config(s_cfg, dtype=torch.float32)
    student.save_pretrained(d / "student", safe_serialization=True)
    tok.save_pretrained(d / "student")
    data = d / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in common.chat_records(tok, n_records, seq_len, prompt_tokens=prompt_tokens)))
    models = {"teacher": {"dir": str(teacher_dir), "parameters": count_parameters(teacher), "matmul_parameters": common.matmul_params(teacher)},
              "student": {"dir": str(d / "student"), "parameters": count_parameters(student), "matmul_parameters": common.matmul_params(student)}}
    return {"teacher_source": teacher_source, "teacher_dir": str(teacher_dir), "student_dir": str(d / "student"),
            "data": str(data), "models": models, "data_check": data_check(tok, data, seq_len)}


def data_check(tok, data: Path, seq_len: int) -> dict:
    """Both tools' view of the JSONL: identical input blocks? how many loss targets each?"""
    from distillery.config import DataConfig
    from distillery.data import build_datasets

    records = [json.loads(ln) for ln in data.read_text().splitlines()]
    ours = build_datasets(DataConfig(train=[str(data)], format="chat", seq_len=seq_len, val_fraction=0.0), tok,
                          progress=False).train
    ob = ours.batch(list(range(len(ours))))
    out = {"records": len(records), "ours_blocks": len(ours), "ours_padding_tokens": int((ob["attention_mask"] == 0).sum()),
           "ours_targets_per_block": float((ob["labels"] != -100).sum()) / len(ours)}
    try:
        from trl.experimental.utils import DataCollatorForChatML
    except ImportError:
        return {**out, "trl": "not installed"}
    tb = DataCollatorForChatML(tokenizer=tok, max_length=seq_len)(records)
    out.update(trl_shape=list(tb["input_ids"].shape), trl_targets_per_block=float((tb["labels"][:, 1:] != -100).sum()) / len(records),
               identical_input_blocks=sorted(map(tuple, tb["input_ids"].tolist())) == sorted(map(tuple, ob["input_ids"].tolist())))
    return out


# ----------------------------------------------------------------------------- parent: alternate, summarise
def summarise(pair: dict, runs: list[dict], peak_gflops: float) -> dict:
    """Per system: median steady tok/s over rounds (and the best round), max peak RSS, MFU; then the
    headline ratios of medians, of best rounds, and per round (A and B of one round ran minutes apart)."""
    n_s, n_t = (pair["models"][k]["matmul_parameters"] for k in ("student", "teacher"))
    systems = {}
    for name in dict.fromkeys(r["system"] for r in runs):
        rs = [r for r in runs if r["system"] == name]
        ok = [r for r in rs if "error" not in r]
        tok_s = common.median_or_none([r.get("steady_tok_s") for r in ok])
        flops = 6 * n_s + (2 * n_t if name.split("+")[0] in ("trl_fair", "trl_defaults", "ours_live") else 0)
        systems[name] = {"tok_s": tok_s, "tok_s_per_round": {r["round"]: r.get("steady_tok_s") for r in ok},
                         "tok_s_best": max((r["steady_tok_s"] for r in ok if r.get("steady_tok_s")), default=None),
                         "peak_rss_bytes": max((r["peak_rss_bytes"] for r in ok), default=None),
                         "flops_per_token": flops,
                         "first_step_loss": common.median_or_none([(r.get("losses") or [None])[0] for r in ok]),
                         "mfu": None if tok_s is None else tok_s * flops / (peak_gflops * 1e9),
                         "errors": [r["error"] for r in rs if "error" in r]}
    ratios, per_round = {}, {}
    for env in ("", "+thp"):
        fair, live, cached, ce = (systems.get(n + env, {}) for n in ("trl_fair", "ours_live", "ours_cached", "student_ce"))
        for a, b, an, bn in ((live, fair, "ours_live", "trl_fair"), (cached, fair, "ours_cached", "trl_fair"),
                             (cached, ce, "ours_cached", "student_ce"), (live, ce, "ours_live", "student_ce")):
            ratios[f"{an}{env}/{bn}{env} tok_s"] = common.ratio(a.get("tok_s"), b.get("tok_s"))
            ratios[f"{an}{env}/{bn}{env} rss"] = common.ratio(a.get("peak_rss_bytes"), b.get("peak_rss_bytes"))
            ratios[f"{an}{env}/{bn}{env} tok_s, best round of each"] = common.ratio(a.get("tok_s_best"), b.get("tok_s_best"))
            paired = {rnd: common.ratio(v, b.get("tok_s_per_round", {}).get(rnd)) for rnd, v in a.get("tok_s_per_round", {}).items()}
            per_round[f"{an}{env}/{bn}{env} tok_s"] = paired  # same round = measured minutes apart
    ratios["trl_fair/trl_defaults tok_s"] = common.ratio(systems.get("trl_fair", {}).get("tok_s"),
                                                         systems.get("trl_defaults", {}).get("tok_s"))
    for n in ("trl_fair", "ours_live", "ours_cached", "student_ce"):
        ratios[f"{n}+thp/{n} tok_s"] = common.ratio(systems.get(n + "+thp", {}).get("tok_s"), systems.get(n, {}).get("tok_s"))
    return {"systems": systems, "ratios": ratios, "ratios_per_round": per_round}


def goals(name: str, ratios: dict) -> dict:
    x, y = GOALS[name]
    out = {}
    for env in ("", "+thp"):
        t, r = ratios.get(f"ours_live{env}/trl_fair{env} tok_s"), ratios.get(f"ours_live{env}/trl_fair{env} rss")
        c = ratios.get(f"ours_cached{env}/student_ce{env} tok_s")
        out[f"live >= {x}x TRL fair tok/s{env}"] = None if t is None else t >= x
        out[f"live <= {y}x TRL fair RSS{env}"] = None if r is None else r <= y
        out[f"cached >= {CACHED_GOAL}x student CE tok/s{env}"] = None if c is None else c >= CACHED_GOAL
    return out


def run_pair(name: str, args, work: Path, log: Path) -> dict:
    steps, warm, d_steps, d_warm = SIZES[name]["quick" if args.quick else "full"]
    steps, warm = args.steps or steps, args.warmup if args.warmup is not None else warm
    print(f"[{name}] setting up models and data", flush=True)
    pair = setup_pair(name, work, n_records=args.batch * max(steps, 8), seq_len=args.seq_len)
    print(f"[{name}] data check: {pair['data_check']}", flush=True)
    base = {"teacher_source": pair["teacher_source"], "teacher_dir": pair["teacher_dir"], "student_dir": pair["student_dir"],
            "data": pair["data"], "seq_len": args.seq_len, "batch": args.batch, "threads": args.threads,
            "cache_dir": str(work / name / "cache")}
    wanted = args.systems.split(",") if args.systems else SYSTEMS
    if name == "real" and not args.real_defaults and not args.systems:
        wanted = [s for s in wanted if s != "trl_defaults"]
    if "ours_cached" in wanted:
        print(f"[{name}] writing the teacher cache (untimed)", flush=True)
        pair["cache_write"] = common.run_child(SYSTEMS_SCRIPT, {**base, "system": "cache", "steps": steps,
                                               "out_dir": str(work / name / "cache_run")}, threads=args.threads, log=log)
    names = wanted + ([s + "+thp" for s in wanted if s != "trl_defaults"] if not args.no_thp else [])
    runs = []
    for rnd, sysname in common.alternate(names, args.rounds):
        system, thp = sysname.split("+")[0], sysname.endswith("+thp")
        if system == "trl_defaults" and rnd > 0:
            continue  # context only: one run
        n, w = (d_steps, d_warm) if system == "trl_defaults" else (steps, warm)
        out_dir = work / name / f"run-{sysname}-{rnd}"
        shutil.rmtree(out_dir, ignore_errors=True)
        spec = {**base, "system": system, "config": "fair" if system == "trl_fair" else "defaults", "steps": n,
                "out_dir": str(out_dir)}
        r = common.run_child(SYSTEMS_SCRIPT, spec, threads=args.threads, env_extra=THP if thp else None, log=log)
        shutil.rmtree(out_dir, ignore_errors=True)
        r.update(system=sysname, round=rnd, steps=n, warmup_skipped=w,
                 steady_tok_s=None if "error" in r else common.steady_tok_s(r["step_seconds"], r["tokens_per_step"], w))
        runs.append(r)
        shown = f"{r['steady_tok_s']:.0f} tok/s, peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB" if "error" not in r else r["error"]
        print(f"[{name}] round {rnd} {sysname:<18} {shown}  ({r.get('wall_s', 0):.0f} s)", flush=True)
    pair.update(steps=steps, warmup_skipped=warm, runs=runs, ours_config=ours_config({**base, "steps": steps, "out_dir": "..."}, False))
    return pair


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: few steps, tiny pair only unless --pair says")
    ap.add_argument("--pair", choices=("tiny", "real", "both"), default=None, help="default: both (tiny with --quick)")
    ap.add_argument("--rounds", type=int, default=None, help="alternation rounds (A B A B = 2; default 3, 2 with --quick)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default per pair and size)")
    ap.add_argument("--warmup", type=int, default=None, help="steps skipped before measuring")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--systems", default=None, help=f"comma-separated subset of {','.join(SYSTEMS)}")
    ap.add_argument("--no-thp", action="store_true", help="skip the THP_MEM_ALLOC_ENABLE=1 runs")
    ap.add_argument("--real-defaults", action="store_true", help="also run TRL's defaults on the real pair (slow)")
    ap.add_argument("--work-dir", default=str(common.ROOT / "runs" / "bench" / "throughput"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.rounds = args.rounds or (2 if args.quick else 3)
    pairs = {"tiny": ["tiny"], "real": ["real"], "both": ["tiny", "real"]}[args.pair or ("tiny" if args.quick else "both")]
    out = Path(args.out or common.RESULTS / ("throughput_quick.json" if args.quick else "throughput.json"))
    work = Path(args.work_dir)
    log = work / "children.log"
    import os

    import torch
    from distillery.hardware import auto_precision, cpu_bf16_report

    torch.set_num_threads(args.threads)  # the probe measures on the children's thread count ...
    os.environ.setdefault("DISTILLERY_CPU_BF16", "1" if cpu_bf16_report()["fast"] else "0")  # ... and decides for all of them
    machine = common.machine_info(threads=args.threads)
    peak_before = common.matmul_peak_gflops(args.threads)
    results = {}
    for name in pairs:
        results[name] = run_pair(name, args, work, log)
    peak_after = common.matmul_peak_gflops(args.threads)
    machine["load_average_end"] = common.loadavg()
    peak = max(peak_before, peak_after)
    for name, pair in results.items():
        pair.update(summarise(pair, pair["runs"], peak))
        pair["goals"] = goals(name, pair["ratios"])
    report = {"benchmark": "throughput", "quick": args.quick, "machine": machine, "cpu_bf16_probe": cpu_bf16_report(),
              "matmul_peak_gflops": {"before": peak_before, "after": peak_after, "used": peak, "threads": args.threads,
                                     "what": "best fp32 square matmul GFLOP/s (n = 512, 1024, 2048), before and after the runs"},
              "mfu_note": "MFU = tok/s x nominal FLOPs/token (6 N_s + 2 N_t, LM heads on every token) / peak. distillery "
                          "applies both LM heads only to target rows (prompt rows skipped), so it does less work per "
                          "token than the nominal count and its MFU reads high by up to the prompt share of head FLOPs.",
              "settings": {"batch": args.batch, "seq_len": args.seq_len, "rounds": args.rounds, "threads": args.threads,
                           "loss": "JSD beta=0.5 (TRL: generalized_jsd_loss, lmbda=0)", "lr": LR,
                           "precision": auto_precision("cpu"),
                           "tokens": "all tokens processed (batch x seq_len, no padding)"},
              "limits": "CPU only, GPU untested; shared machine: absolute numbers are context, ratios from the same run "
                        "are the result" + ("; --quick: few steps, noisy" if args.quick else ""),
              "pairs": results}
    common.write_json(report, out)
    print_summary(report)
    print(f"wrote {out}")


def print_summary(report: dict) -> None:
    for name, pair in report["pairs"].items():
        print(f"\n{name} pair (matmul peak {report['matmul_peak_gflops']['used']:.0f} GFLOP/s):")
        print(f"  {'system':<20}{'tok/s':>10}{'peak RSS GB':>13}{'MFU':>8}")
        for s, v in pair["systems"].items():
            tok = f"{v['tok_s']:.0f}" if v["tok_s"] else "-"
            rss = f"{v['peak_rss_bytes'] / 1e9:.2f}" if v["peak_rss_bytes"] else "-"
            mfu = f"{v['mfu']:.1%}" if v["mfu"] else "-"
            print(f"  {s:<20}{tok:>10}{rss:>13}{mfu:>8}  {'; '.join(v['errors'])[:80]}")
        for k, v in pair["ratios"].items():
            if v is not None:
                print(f"  {k:<45} {v:.2f}")
        for k, v in pair["goals"].items():
            print(f"  goal {k}: {'met' if v else 'not met' if v is not None else 'not measured'}")


if __name__ == "__main__":
    main()
