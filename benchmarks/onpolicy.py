"""On-policy distillation speed: distillery at ``generation.on_policy_fraction=1`` vs TRL's ``DistillationTrainer``.

    .venv/bin/python benchmarks/onpolicy.py [--quick] [--pair tiny|real|both] [--rounds 3] [--threads 2] [--thp]

Every step of both systems: the student samples ``--max-new-tokens`` tokens (temperature 1, top-p 1, top-k off) for
``--batch`` chat prompts, the teacher scores the samples, and the student takes one AdamW step on the generalized
JSD (β = 0.5, temperature 1) over the sampled tokens. Same saved student and teacher, same prompts (checked token
for token), same stop tokens (written into the student's generation config), same learning rate; each system in
its own process, alternated A B A B, with the same allocator setting (``--thp``: ``THP_MEM_ALLOC_ENABLE=1`` for
both). Ours sets glibc's mmap threshold in-process (``train.return_large_frees``), so TRL also runs under it
(``trl_<prec>+frees``: ``MALLOC_MMAP_THRESHOLD_=1048576``) and ours without it (``ours_<prec>-frees``); the RSS goal is
judged against TRL's lowest peak in its fastest precision (BENCHMARKS.md). Fair CPU settings for TRL: no gradient
checkpointing, no vLLM, bf16 exactly where the CPU runs it fast (``distillery.hardware.cpu_bf16_fast``; there both
tools also run fp32, and the headline is ours, in the precision ``auto`` picks, against the faster TRL run). TRL in
bf16 gets a bf16 teacher too.

Reported per system: generated tok/s (sampled tokens, EOS included), total tok/s (prompt + sampled tokens the
step trains on), the split of a step (sampling / teacher backbone forward / the rest: student forward and
backward, both LM heads and the JSD, optimizer), peak RSS (``VmHWM``), the first-step loss. The two tools'
first-step losses come from different samples; ``parity`` scores one identical sampled batch with both tools'
loss code in fp32, where they must agree to float rounding.

Pairs: ``tiny`` (throughput.py's: teacher 6 layers d=384, student 3 layers d=192, vocabulary 4,096, random init) and
``real``: SmolLM2-135M-Instruct teacher and the demo's trained student (``--real-student``, 8 layers d=384, 31.9M,
tied; it writes real text and ends its answers).

Writes ``benchmarks/results/onpolicy.json`` (``onpolicy_quick.json`` with ``--quick``); ``--merge`` keeps the other
pair already there, so each pair can run in its own lock-held run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

LR = 1e-4
THP = {"THP_MEM_ALLOC_ENABLE": "1"}
FREES = {"MALLOC_MMAP_THRESHOLD_": "1048576"}  # = distillery.hardware.LARGE_FREE_BYTES, set through glibc's environment
SIZES = {"tiny": {"full": (10, 2), "quick": (3, 1)}, "real": {"full": (6, 1), "quick": (2, 1)}}  # steps, warm-up
GOALS = {"tiny": (1.5, None), "real": (2.0, 0.5)}  # ours vs fastest TRL: >= x tok/s (total), <= y peak RSS


def setup(name: str, work: Path, n_records: int, seq_len: int, prompt_tokens: int, student: str | None = None) -> dict:
    """Teacher, student and chat data (throughput.setup_pair), then one stop-token list for both tools. For the
    real pair, ``student`` (an HF folder with the teacher's vocabulary) replaces throughput's random 4x256 student."""
    from transformers import AutoTokenizer, GenerationConfig

    import throughput
    from distillery.onpolicy import stop_token_ids

    pair = throughput.setup_pair(name, work, n_records=n_records, seq_len=seq_len, prompt_tokens=prompt_tokens)
    if name == "real" and student is not None:  # the demo's student (its shape, and weights that write real text)
        from distillery.students import count_parameters
        from transformers import AutoModelForCausalLM

        for f in ("config.json", "model.safetensors"):
            shutil.copy(Path(student) / f, Path(pair["student_dir"]) / f)
        model = AutoModelForCausalLM.from_pretrained(pair["student_dir"])
        pair["models"]["student"] = {"dir": pair["student_dir"], "from": str(student), "parameters": count_parameters(model),
                                     "matmul_parameters": common.matmul_params(model)}
        del model
    tok = AutoTokenizer.from_pretrained(pair["student_dir"])
    # An answer that starts with a newline merges it with the template's "assistant\n" into one token: our prompt
    # (cut where the answer's loss begins) would then end a token early. Only prompts matter here: strip it.
    data = Path(pair["data"])
    records = [json.loads(ln) for ln in data.read_text().splitlines()]
    for r in records:
        r["messages"][-1]["content"] = r["messages"][-1]["content"].lstrip()
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    gen_cfg = GenerationConfig.from_pretrained(pair["student_dir"]) if (Path(pair["student_dir"]) / "generation_config.json").is_file() \
        else GenerationConfig()
    gen_cfg.eos_token_id = stop_token_ids(tok)  # TRL stops at these; ours adds the same end-of-turn ids itself
    gen_cfg.save_pretrained(pair["student_dir"])
    pair["stop_token_ids"] = gen_cfg.eos_token_id
    pair["prompt_check"] = prompt_check(tok, Path(pair["data"]), seq_len)
    return pair


def prompt_check(tok, data: Path, seq_len: int) -> dict:
    """Both tools' prompts: ours cut from the packed chat blocks where the loss begins, TRL's rendered with
    ``add_generation_prompt=True``. Identical multisets of token sequences, or the comparison is off."""
    from distillery.config import DataConfig
    from distillery.data import build_datasets
    from distillery.onpolicy import prompt_lengths

    records = [json.loads(ln) for ln in data.read_text().splitlines()]
    ds = build_datasets(DataConfig(train=[str(data)], format="chat", seq_len=seq_len, val_fraction=0.0), tok, progress=False).train
    b = ds.batch(list(range(len(ds))))
    n = prompt_lengths(b["labels"], b["attention_mask"], 64)
    ours = sorted(tuple(b["input_ids"][i, :int(n[i])].tolist()) for i in range(len(ds)))
    theirs = []
    for r in records:
        ids = tok.apply_chat_template(r["messages"][:1], add_generation_prompt=True, tokenize=True)
        theirs.append(tuple(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return {"records": len(records), "ours_blocks": len(ds), "identical_prompts": ours == sorted(theirs),
            "prompt_tokens_mean": sum(map(len, theirs)) / max(len(theirs), 1)}


def timer_hooks(module, sink: list):
    """Seconds of each forward of ``module`` appended to ``sink`` (pre- and post-forward hooks)."""
    start = []
    module.register_forward_pre_hook(lambda *a: start.append(time.perf_counter()))
    module.register_forward_hook(lambda *a: sink.append(time.perf_counter() - start.pop()))


def child_ours(spec: dict) -> dict:
    import distillery.train as train
    from distillery.config import RunConfig

    bf16 = spec["precision"] == "bf16"
    sampling, teacher_s, tokens, generated = [], [], [], []
    real_on_policy_batch, real_prepare = train.on_policy_batch, train.prepare_run

    def timed_batch(*a, **k):
        t0 = time.perf_counter()
        out = real_on_policy_batch(*a, **k)
        sampling.append(time.perf_counter() - t0)
        tokens.append(int(out["attention_mask"].sum()))
        generated.append(int((out["labels"] != -100).sum()))
        return out

    def prepare(*a, **k):
        run = real_prepare(*a, **k)
        timer_hooks(run.teacher.model.base_model, teacher_s)  # the backbone; its LM head runs inside our loss
        return run

    train.on_policy_batch, train.prepare_run = timed_batch, prepare
    cfg = {"teacher": {"kind": "hf", "source": spec["teacher_source"], "dtype": "bfloat16" if bf16 else "float32"},
           "student": {"init": "pretrained", "pretrained": spec["student_dir"]},
           "data": {"train": [spec["data"]], "format": "chat", "seq_len": spec["seq_len"], "val_fraction": 0.0},
           "loss": {"kd": "jsd", "beta": 0.5, "kd_weight": 1.0, "ce_weight": 0.0, "loss_temperature": 1.0},
           "generation": {"on_policy_fraction": 1.0, "max_new_tokens": spec["max_new_tokens"], "sample_temperature": 1.0,
                          "top_p": 1.0, "collapse_guard": "off"},
           "train": {"output_dir": spec["out_dir"], "max_steps": spec["steps"], "micro_batch_size": spec["batch"],
                     "lr": LR, "warmup_steps": 0, "eval_every": 0, "save_every": 0, "log_every": 1, "progress": False,
                     "mixed_precision": "bf16" if bf16 else "no", "return_large_frees": spec.get("frees", True)}}
    train.distill(RunConfig.model_validate(cfg))
    recs = [json.loads(ln) for ln in (Path(spec["out_dir"]) / "metrics.jsonl").read_text().splitlines() if ln]
    steps = [r for r in recs if "tok_s" in r]
    return {"step_seconds": [n / r["tok_s"] for n, r in zip(tokens, steps)], "tokens_per_step": tokens,
            "generated_per_step": generated, "sampling_seconds": sampling, "teacher_seconds": teacher_s,
            "losses": [r["loss"] for r in steps], "config": cfg}


def trl_trainer(spec: dict, steps: int, callbacks=()):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DistillationConfig, DistillationTrainer

    bf16 = spec["precision"] == "bf16"
    tok = AutoTokenizer.from_pretrained(spec["student_dir"])
    student = AutoModelForCausalLM.from_pretrained(spec["student_dir"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher_dir"], dtype=torch.bfloat16 if bf16 else torch.float32)
    prompts = [{"prompt": json.loads(ln)["messages"][:1]} for ln in Path(spec["data"]).read_text().splitlines()]
    args = DistillationConfig(output_dir=tempfile.mkdtemp(prefix="trl-distill-"), use_cpu=True, bf16=bf16,
                              gradient_checkpointing=False, use_vllm=False, beta=0.5, temperature=1.0, top_p=1.0,
                              top_k=0, max_completion_length=spec["max_new_tokens"],
                              per_device_train_batch_size=spec["batch"], max_steps=steps, learning_rate=LR,
                              logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(prompts),
                                  processing_class=tok, callbacks=list(callbacks))
    return trainer, teacher, args


def child_trl(spec: dict) -> dict:
    clock = common.trainer_clock()
    trainer, teacher, args = trl_trainer(spec, spec["steps"], [clock])
    sampling, teacher_s, tokens, generated = [], [], [], []
    real_generate = trainer._generate_single_turn

    def timed_generate(prompt_ids, *a, **k):
        t0 = time.perf_counter()
        completions = real_generate(prompt_ids, *a, **k)  # per row: sampled ids up to and including the EOS
        sampling.append(time.perf_counter() - t0)
        generated.append(sum(map(len, completions)))
        tokens.append(generated[-1] + sum(map(len, prompt_ids)))
        return completions

    trainer._generate_single_turn = timed_generate
    timer_hooks(teacher.base_model, teacher_s)  # TRL runs the teacher's backbone; its LM head runs in the loss
    trainer.train()
    shutil.rmtree(args.output_dir, ignore_errors=True)
    t = clock.ticks
    return {"step_seconds": [b - a for a, b in zip(t, t[1:])], "tokens_per_step": tokens, "generated_per_step": generated,
            "sampling_seconds": sampling, "teacher_seconds": teacher_s, "losses": clock.losses,
            "trl_settings": {"bf16": args.bf16, "gradient_checkpointing": args.gradient_checkpointing, "use_vllm": args.use_vllm,
                             "beta": args.beta, "temperature": args.temperature, "top_k": args.top_k,
                             "max_completion_length": args.max_completion_length, "optim": str(args.optim)}}


def child_parity(spec: dict) -> dict:
    """One sampled batch (ours), scored by both tools' loss code in fp32: distillery's chunked JSD and TRL's
    ``DistillationTrainer._compute_loss`` on the same prompts and completions."""
    import torch
    from transformers import AutoTokenizer

    from distillery.config import DataConfig, GenerationConfig
    from distillery.data import build_datasets
    from distillery.evaluate import student_hidden
    from distillery.losses import chunked_distill_loss
    from distillery.onpolicy import on_policy_batch
    from distillery.targets import TeacherTargets

    trainer, teacher, args = trl_trainer({**spec, "precision": "fp32"}, 1)
    student = trainer.model
    tok = AutoTokenizer.from_pretrained(spec["student_dir"])
    ds = build_datasets(DataConfig(train=[spec["data"]], format="chat", seq_len=spec["seq_len"], val_fraction=0.0), tok,
                        progress=False).train
    gen = GenerationConfig(on_policy_fraction=1.0, max_new_tokens=spec["max_new_tokens"], sample_temperature=1.0)
    batch = on_policy_batch(student, ds.batch(list(range(min(spec["batch"], len(ds))))), tok, gen,
                            generator=torch.Generator().manual_seed(0))
    labels, mask, ids = batch["labels"], batch["attention_mask"], batch["input_ids"]
    n = int((labels != -100).sum())
    with torch.no_grad():
        t_hidden = teacher.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        targets = TeacherTargets(hidden=t_hidden, lm_head_weight=teacher.get_output_embeddings().weight, mask=labels != -100)
        ours, _ = chunked_distill_loss(student_hidden(student, batch), student.get_output_embeddings().weight, targets, labels,
                                       kd="jsd", beta=0.5, loss_temperature=1.0, kd_weight=1.0, ce_weight=0.0, n_tokens=n)
        # TRL's layout: prompts left-padded, completions right-padded; the loss is on completion positions
        first = (labels != -100).long().argmax(dim=1)              # last prompt position per row
        real = mask.sum(dim=1)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        rows_p = [ids[b, :int(first[b]) + 1] for b in range(len(ids))]
        rows_c = [ids[b, int(first[b]) + 1:int(real[b])] for b in range(len(ids))]
        P, C = max(map(len, rows_p)), max(map(len, rows_c))
        inputs = {"prompt_ids": torch.full((len(ids), P), pad), "prompt_mask": torch.zeros(len(ids), P, dtype=torch.long),
                  "completion_ids": torch.full((len(ids), C), pad), "completion_mask": torch.zeros(len(ids), C, dtype=torch.long)}
        for b, (p, c) in enumerate(zip(rows_p, rows_c)):
            inputs["prompt_ids"][b, P - len(p):], inputs["prompt_mask"][b, P - len(p):] = p, 1
            inputs["completion_ids"][b, :len(c)], inputs["completion_mask"][b, :len(c)] = c, 1
        theirs = trainer._compute_loss(student, inputs, torch.tensor(float(n)))[0]
    shutil.rmtree(args.output_dir, ignore_errors=True)
    return {"ours": float(ours), "trl": float(theirs), "abs_diff": abs(float(ours) - float(theirs)), "target_tokens": n}


def child_main(spec_path: str, result_path: str) -> None:
    import torch

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    result = {"ours": child_ours, "trl": child_trl, "parity": child_parity}[spec["system"]](spec)
    result["peak_rss_bytes"] = common.peak_rss_bytes()
    Path(result_path).write_text(json.dumps(result))


def steady(run: dict, warm: int) -> dict:
    """Rates and the split over the steps after ``warm`` (sums over steps, not means of rates)."""
    sec = run["step_seconds"][warm:]
    total = sum(sec)
    if not sec or total <= 0:
        return {}
    samp, teach = sum(run["sampling_seconds"][warm:len(run["step_seconds"])]), sum(run["teacher_seconds"][warm:len(run["step_seconds"])])
    return {"tok_s": sum(run["tokens_per_step"][warm:]) / total, "generated_tok_s": sum(run["generated_per_step"][warm:]) / total,
            "step_s": total / len(sec), "split": {"sampling": samp / total, "teacher_forward": teach / total,
                                                   "student_loss_optimizer": max(0.0, 1 - (samp + teach) / total)}}


def summarise(runs: list[dict]) -> dict:
    systems = {}
    for name in dict.fromkeys(r["system"] for r in runs):
        ok = [r for r in runs if r["system"] == name and "error" not in r and r.get("steady")]
        med = lambda key: common.median_or_none([r["steady"][key] for r in ok])  # noqa: E731
        systems[name] = {"tok_s": med("tok_s"), "generated_tok_s": med("generated_tok_s"), "step_s": med("step_s"),
                         "split": {k: common.median_or_none([r["steady"]["split"][k] for r in ok])
                                   for k in ("sampling", "teacher_forward", "student_loss_optimizer")},
                         "peak_rss_bytes": max((r["peak_rss_bytes"] for r in ok), default=None),
                         "first_step_loss": common.median_or_none([(r.get("losses") or [None])[0] for r in ok]),
                         "errors": [r["error"] for r in runs if r["system"] == name and "error" in r]}
    trl = [n for n in systems if n.startswith("trl") and systems[n]["tok_s"]]
    best = max(trl, key=lambda n: systems[n]["tok_s"], default=None)
    ours = next((n for n in systems if n.startswith("ours")), None)  # the first: the precision auto picks
    a, b = systems.get(ours, {}), systems.get(best, {})
    # TRL's lowest peak in its fastest precision, with or without the allocator setting ours uses (BENCHMARKS.md)
    same_precision = [n for n in trl if best and n.split("+")[0] == best.split("+")[0]]
    low = min(same_precision, key=lambda n: systems[n]["peak_rss_bytes"] or float("inf"), default=None)
    ratios = {"peer": best, "ours": ours,
              "tok_s": common.ratio(a.get("tok_s"), b.get("tok_s")),
              "generated_tok_s": common.ratio(a.get("generated_tok_s"), b.get("generated_tok_s")),
              "peak_rss": common.ratio(a.get("peak_rss_bytes"), (systems.get(low) or {}).get("peak_rss_bytes")),
              "peak_rss_peer": low,
              "peak_rss_vs_fastest_trl": common.ratio(a.get("peak_rss_bytes"), b.get("peak_rss_bytes"))}
    return {"systems": systems, "ratios": ratios}


def run_pair(name: str, args, work: Path, log: Path, bf16_fast: bool, bf16_flag: bool) -> dict:
    steps, warm = SIZES[name]["quick" if args.quick else "full"]
    steps, warm = args.steps or steps, args.warmup if args.warmup is not None else warm
    print(f"[{name}] setting up models and data", flush=True)
    real_student = args.real_student if args.real_student and (Path(args.real_student) / "model.safetensors").is_file() else None
    pair = setup(name, work, n_records=args.batch * (steps + 1), seq_len=args.seq_len, prompt_tokens=args.prompt_tokens,
                 student=real_student)
    print(f"[{name}] prompt check: {pair['prompt_check']}", flush=True)
    base = {k: pair[k] for k in ("teacher_source", "teacher_dir", "student_dir", "data")}
    base.update(seq_len=args.seq_len, batch=args.batch, threads=args.threads, max_new_tokens=args.max_new_tokens)
    env = THP if args.thp else None
    pair["parity"] = common.run_child(Path(__file__), {**base, "system": "parity"}, threads=args.threads, env_extra=env, log=log)
    print(f"[{name}] parity (same batch, fp32): {pair['parity']}", flush=True)
    prec, other = ("bf16", "fp32") if bf16_fast else ("fp32", "bf16")
    names = [f"ours_{prec}", f"trl_{prec}"]
    if not args.quick:  # TRL under ours' allocator setting, ours without it (BENCHMARKS.md: both ways)
        names += [f"trl_{prec}+frees", f"ours_{prec}-frees"]
    if bf16_flag and not args.quick:  # the other precision may be the faster one on this CPU: run it too (context)
        names += [f"trl_{other}", f"trl_{other}+frees", f"ours_{other}"]
    if args.systems:
        names = args.systems.split(",")
    runs = []
    for rnd, sysname in common.alternate(names, args.rounds):
        system, precision = sysname.split("_")
        frees = not precision.endswith("-frees")  # ours: train.return_large_frees off
        env_sys = {**(env or {}), **FREES} if precision.endswith("+frees") else env  # TRL under ours' allocator setting
        precision = precision.split("+")[0].split("-")[0]
        out_dir = work / name / f"run-{sysname}-{rnd}"
        shutil.rmtree(out_dir, ignore_errors=True)
        r = common.run_child(Path(__file__), {**base, "system": system, "precision": precision, "steps": steps,
                                              "out_dir": str(out_dir), "frees": frees}, threads=args.threads,
                             env_extra=env_sys, log=log)
        shutil.rmtree(out_dir, ignore_errors=True)
        r.update(system=sysname, round=rnd, steady=None if "error" in r else steady(r, warm))
        runs.append(r)
        s = r["steady"] or {}
        shown = r["error"] if "error" in r else (f"{s.get('tok_s', 0):.0f} tok/s ({s.get('generated_tok_s', 0):.0f} generated), "
                                                 f"peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB, first loss {r['losses'][0]:.4f}")
        print(f"[{name}] round {rnd} {sysname:<16} {shown}  ({r.get('wall_s', 0):.0f} s)", flush=True)
    pair.update(steps=steps, warmup_skipped=warm, runs=runs, **summarise(runs))
    x, y = GOALS[name]
    t, m = pair["ratios"]["tok_s"], pair["ratios"]["peak_rss"]
    pair["goals"] = {f"ours >= {x}x fastest TRL tok/s": None if t is None else t >= x}
    if y is not None:
        pair["goals"][f"ours <= {y}x its peak RSS"] = None if m is None else m <= y
    return pair


def main() -> None:
    from distillery.hardware import cpu_bf16_report

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: few steps, one round, tiny pair unless --pair says")
    ap.add_argument("--pair", choices=("tiny", "real", "both"), default=None, help="default: both (tiny with --quick)")
    ap.add_argument("--rounds", type=int, default=None, help="alternation rounds (default 3, 1 with --quick)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None, help="steps skipped before measuring")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=64, help="user-turn tokens per prompt (the chat template adds more)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=192, help="chat block length (prompt + a reference answer)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--thp", action="store_true", help="THP_MEM_ALLOC_ENABLE=1 for every system")
    ap.add_argument("--systems", default=None, help="comma-separated, e.g. ours_fp32,trl_fp32,trl_fp32+frees,ours_fp32-frees (default: the "
                    "probe's precision for both; on a CPU with a bf16 flag also the other, unless --quick)")
    ap.add_argument("--real-student", default=str(common.ROOT / "runs" / "bench" / "demo" / "kd" / "student"),
                    help="student of the real pair (default: the demo's trained student, 8 layers d=384; when that "
                         "folder is missing, throughput's random 4-layer d=256 student)")
    ap.add_argument("--work-dir", default=str(common.ROOT / "runs" / "bench" / "onpolicy"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--merge", action="store_true", help="keep the other pairs already in --out (one run per pair)")
    args = ap.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 3)
    pairs = {"tiny": ["tiny"], "real": ["real"], "both": ["tiny", "real"]}[args.pair or ("tiny" if args.quick else "both")]
    out = Path(args.out or common.RESULTS / ("onpolicy_quick.json" if args.quick else "onpolicy.json"))
    work = Path(args.work_dir)
    machine = common.machine_info(threads=args.threads)
    import torch

    torch.set_num_threads(args.threads)
    probe = cpu_bf16_report()  # measured on the benchmark's thread count
    results = {name: run_pair(name, args, work, work / "children.log", probe["fast"], bool(probe["flags"])) for name in pairs}
    machine["load_average_end"] = common.loadavg()
    for pair in results.values():
        pair["machine"] = machine  # with --merge the pairs come from different runs
    if args.merge and out.is_file():  # keep the other pairs of an earlier run (one lock-held run per pair)
        results = {**json.loads(out.read_text()).get("pairs", {}), **results}
    report = {"benchmark": "onpolicy", "quick": args.quick, "machine": machine, "cpu_bf16_probe": probe,
              "settings": {"batch": args.batch, "prompt_tokens": args.prompt_tokens, "max_new_tokens": args.max_new_tokens,
                           "sample_temperature": 1.0, "top_p": 1.0, "loss": "generalized JSD beta=0.5, temperature 1",
                           "lr": LR, "rounds": args.rounds, "threads": args.threads,
                           "allocator": "THP_MEM_ALLOC_ENABLE=1 for all" if args.thp else "default for all"},
              "limits": "CPU only; shared machine: absolute numbers are context, ratios from the same run are the result; "
                        "first-step losses of the two tools come from different samples (parity: same batch)"
                        + ("; --quick: few steps, one round, noisy" if args.quick else ""),
              "pairs": results}
    common.write_json(report, out)
    for name in pairs:
        print(f"\n{name}: {json.dumps(results[name]['ratios'])}\n  goals: {results[name]['goals']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    if "--child" in sys.argv:  # common.run_child: onpolicy.py --child SPEC --result OUT
        child_main(sys.argv[sys.argv.index("--child") + 1], sys.argv[sys.argv.index("--result") + 1])
    else:
        main()
