"""Quality of the student: SmolLM2-135M-Instruct teacher -> a student <= 1/4 its size, equal steps.

    .venv/bin/python benchmarks/quality.py [--quick] [--steps N] [--work-dir runs/bench/quality]

Four runs of the same student shape (Minitron-style targets, default 8 layers, d=384, FFN 1,024,
6 heads / 3 KV heads, head_dim 64, tied embeddings: 31.9M = 0.24x the teacher), same data
(Shakespeare, blocks of ``seq_len``), same batch and steps, each through ``distillery distill``
(the product's CLI, one process per run):

1. ``ce_random``: cross-entropy only, random init (the usual pre-training baseline);
2. ``kd_random``: forward KL to the live teacher, random init;
3. ``kd_pruned``: forward KL, the student pruned from the teacher (``student.init: pruned``);
4. ``kd_pruned_onpolicy``: as 3 with ``generation.on_policy_fraction=0.5`` (GKD's lambda; on-policy
   steps train on the student's own 64-token continuations, so fewer target tokens).

On request (``--runs``), ``kd_pruned_jsd`` and ``kd_pruned_onpolicy_jsd``: 3 and 4 with JSD(beta=0.5),
the divergence GKD pairs with on-policy data, and ``kd_pruned_onpolicy_jsd_late``: on-policy only from
a quarter of the steps on (``generation.on_policy_start``), after supervised KD.

Validation (KL to the teacher, top-1 agreement, perplexity) every ``eval_every`` steps gives the
curves; step 0 (the initial student) is evaluated here with the loop's own batches. At the end every
student is evaluated on the whole held-out split and on Milton's *Paradise Lost* (never trained on),
on their own continuations of the held-out prompts (``evaluate_own_samples``: 64 sampled tokens, 3 seeds, the
measure on-policy training targets), and teacher and students continue one prompt greedily. BLiMP (``--blimp-per-paradigm``
pairs per paradigm, after ``<|endoftext|>``) and answer fidelity (``tasks.fidelity``'s 12 general chat prompts, greedy and
sampled, the teacher's answers generated once) for the teacher and every arm, unless ``--tasks none``; with ``--eval-only``
they score the recorded students without retraining. Goals (reported, met or not): (2) beats (1)
on held-out KL by >= 30%; (3) reaches (2)'s final validation KL in <= 1/2 of (2)'s tokens.

Writes ``benchmarks/results/quality.json`` (``quality_quick.json`` with ``--quick``) and, in the work
folder, ``results.json`` + ``report.html`` (``distillery report`` of the four runs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PRUNE = {"layers": 8, "hidden": 384, "ffn": 1024, "heads": 6}
KV_HEADS, HEAD_DIM = 3, 64  # what pruning 6 of SmolLM2's 9 heads (3 KV groups of 3) keeps
SIZES = {  # steps, micro batch, seq_len, eval_every, eval_batches, max_val_blocks, warmup
    "full": (300, 8, 256, 20, 4, 64, 20),
    "medium": (60, 8, 128, 10, 4, 32, 6),  # ~61k tokens per run: what a shared 2-core CPU finishes in ~30 min
    "quick": (16, 4, 128, 4, 2, 16, 4),
}
PROMPT = "To be, or not to be"


def base_config(args, name: str) -> dict:
    steps, batch, seq, every, ev_batches, val_blocks, warm = SIZES["quick" if args.quick else args.size]
    steps = args.steps or steps
    student = {"init": "config", "model": {"model_type": "llama", "hidden_size": PRUNE["hidden"],
                                           "intermediate_size": PRUNE["ffn"], "num_hidden_layers": PRUNE["layers"],
                                           "num_attention_heads": PRUNE["heads"], "num_key_value_heads": KV_HEADS,
                                           "head_dim": HEAD_DIM, "tie_word_embeddings": True}}
    if "pruned" in name:
        student = {"init": "pruned", "prune": dict(PRUNE)}
    kd = name != "ce_random"
    return {"teacher": {"source": "smollm2"}, "student": student,
            "data": {"train": ["demo:shakespeare"], "seq_len": seq, "val_fraction": 0.02, "max_val_blocks": val_blocks},
            "loss": {"kd": "jsd" if "_jsd" in name else "forward_kl", "beta": 0.5, "kd_weight": 1.0 if kd else 0.0, "ce_weight": 0.0 if kd else 1.0,
                     "loss_temperature": 1.0, "chunk_size": 512},
            "generation": {"on_policy_fraction": 0.5 if "onpolicy" in name else 0.0,
                           # _late: supervised KD for the first quarter, then lambda = 0.5 (docs/prune.md)
                           "on_policy_start": steps // 4 if name.endswith("_late") else 0,
                           # the JSD run from step 0 is kept to show its collapse: warned, not stopped
                           "collapse_guard": "warn" if name == "kd_pruned_onpolicy_jsd" else "error"},
            "train": {"output_dir": str(Path(args.work_dir) / name), "max_steps": steps, "micro_batch_size": batch,
                      "lr": args.lr, "warmup_steps": warm, "eval_every": every, "eval_batches": ev_batches,
                      "save_every": 0, "progress": False, "seed": getattr(args, "seed", 0)}}


RUNS = ["ce_random", "kd_random", "kd_pruned", "kd_pruned_onpolicy"]
# GKD's pairing, on request (--runs): JSD(beta=0.5) off- and on-policy, so that the policy is the only difference
# (from step 0 the student collapses; ``_late`` starts on-policy after a quarter of supervised KD)
EXTRA_RUNS = ["kd_pruned_jsd", "kd_pruned_onpolicy_jsd", "kd_pruned_onpolicy_jsd_late"]


def train_all(args, names: list[str], log: Path) -> dict:
    """Each run through the CLI in its own process; returns wall seconds (or an error) per run."""
    info = {}
    for name in names:
        cfg = base_config(args, name)
        out = Path(cfg["train"]["output_dir"])
        shutil.rmtree(out, ignore_errors=True)
        recipe = Path(args.work_dir) / f"{name}.yaml"
        recipe.parent.mkdir(parents=True, exist_ok=True)
        recipe.write_text(yaml.safe_dump(cfg, sort_keys=False))
        cmd = [sys.executable, "-m", "distillery.cli", "distill", str(recipe)]
        print(f"[quality] {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=common.child_env(args.threads), cwd=common.ROOT)
        with open(log, "a") as fh:
            fh.write(f"\n==== {name}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}\n")
        info[name] = {"seconds": time.perf_counter() - t0, "recipe": str(recipe)}
        if proc.returncode != 0:
            info[name]["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1]
            print(f"[quality] {name} failed: {info[name]['error']}", flush=True)
    return info


def evaluate_all(args, names: list[str]) -> dict:
    """Step-0 validation of both inits, final held-out + Milton metrics, and greedy samples."""
    import torch
    from transformers import AutoModelForCausalLM

    from distillery.config import DataConfig, RunConfig
    from distillery.data import build_datasets
    from distillery.demo import _sample
    from distillery.evaluate import evaluate
    from distillery.run_setup import prepare_run
    from distillery.students import count_parameters
    from distillery.train import collate

    torch.set_num_threads(args.threads)
    out = {"runs": {}, "step0": {}}
    for init, name in (("random", "kd_random"), ("pruned", "kd_pruned")):
        cfg = RunConfig.model_validate(base_config(args, name))
        run = prepare_run(cfg, device=torch.device("cpu"))  # the exact initial student the run started from
        bs = cfg.train.micro_batch_size
        val = (collate(run.val, torch.arange(i, min(i + bs, len(run.val)))) for i in range(0, len(run.val), bs))
        out["step0"][init] = evaluate(run.eval_teacher, run.student, val, vocab_size=run.vocab_size,
                                      max_batches=cfg.train.eval_batches)
        teacher, tokenizer, vocab, heldout = run.teacher, run.tokenizer, run.vocab_size, run.val
    out["teacher"] = {"name": teacher.name, "parameters": count_parameters(teacher.model)}
    milton = build_datasets(DataConfig(train=["demo:milton"], seq_len=cfg.data.seq_len, val_fraction=0.0,
                                       max_train_blocks=cfg.data.max_val_blocks), tokenizer, progress=False).train

    def batches(ds):
        return (collate(ds, torch.arange(i, min(i + bs, len(ds)))) for i in range(0, len(ds), bs))

    out["teacher_own_samples"] = own_samples(teacher, teacher.model, tokenizer, batches, heldout, vocab)
    new = 24 if args.quick else 40
    t_text, t_speed = _sample(teacher.model, tokenizer, PROMPT, new)
    out["samples"] = []
    for name in names:
        folder = Path(args.work_dir) / name / "student"
        if not (folder / "config.json").is_file():
            continue
        student = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        s_text, s_speed = _sample(student, tokenizer, PROMPT, new)
        out["runs"][name] = {"student_dir": str(folder), "parameters": count_parameters(student),
                             "heldout": evaluate(teacher, student, batches(heldout), vocab_size=vocab),
                             "milton": evaluate(teacher, student, batches(milton), vocab_size=vocab),
                             "own_samples": own_samples(teacher, student, tokenizer, batches, heldout, vocab),
                             "decode_tok_s": s_speed}
        out["samples"].append({"prompt": PROMPT, "teacher": t_text, "student": s_text, "student_run": name,
                               "teacher_decode_tok_s": t_speed, "student_decode_tok_s": s_speed})
    if args.tasks != "none":
        from distillery.tasks.fidelity import DEFAULT_PROMPTS

        students = {n: AutoModelForCausalLM.from_pretrained(r["student_dir"], dtype=torch.float32).eval()
                    for n, r in out["runs"].items()}
        out["tasks"] = task_scores(teacher.model, tokenizer, students, per_paradigm=1 if args.quick else args.blimp_per_paradigm,
                                   prompts=list(DEFAULT_PROMPTS[:3] if args.quick else DEFAULT_PROMPTS),
                                   max_new_tokens=16 if args.quick else 64)
    return out


BLIMP_PREFIX = "<|endoftext|>"  # the demo's choice (distillery.demo_eval): the same prefix for every model


def task_scores(teacher_model, tokenizer, students: dict, *, per_paradigm: int, prompts: list[str] | None = None,
                max_new_tokens: int = 64, seed: int = 0) -> dict:
    """BLiMP and answer fidelity of the teacher and each of ``students`` (``{name: model}``, the teacher's tokenizer).

    Returns ``{"blimp": settings, "teacher": {"blimp", "fidelity"}, "runs": {name: {"blimp",
    "blimp_retained_above_chance", "fidelity", "answers"}}}``: BLiMP tables without the per-paradigm rows,
    fidelity means of the greedy and sampled answers; the teacher answers once, its answers reused for every student.
    """
    from distillery.tasks.blimp import CREDIT, load_pairs, retained_above_chance, score_blimp
    from distillery.tasks.fidelity import score_fidelity

    def lite(table):
        return {k: table[k] for k in ("overall", "per_field", "n_pairs", "prefix_token", "seconds")}

    pairs = load_pairs(per_paradigm=per_paradigm, seed=seed)
    tb = score_blimp(teacher_model, tokenizer, pairs, prefix=BLIMP_PREFIX, name="teacher")
    out = {"blimp": {"per_paradigm": per_paradigm, "n_pairs": len(pairs), "prefix": BLIMP_PREFIX, "chance": 0.5,
                     "credit": CREDIT}, "teacher": {"blimp": lite(tb)}, "runs": {}}
    given = None
    for name, model in students.items():
        sb = score_blimp(model, tokenizer, pairs, prefix=BLIMP_PREFIX, name=name)
        fid = score_fidelity(teacher_model, tokenizer, model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                             seed=seed, teacher_answers=given)
        if given is None:
            given = {k: [r["answers"][k] for r in fid["records"]] for k in ("teacher_greedy", "teacher_sampled")}
            out["teacher"]["fidelity"] = {k: fid["means"][k] for k in given}
            out["fidelity_settings"] = fid["settings"]
        out["runs"][name] = {"blimp": lite(sb), "blimp_retained_above_chance": retained_above_chance(sb["overall"], tb["overall"]),
                             "fidelity": {k: fid["means"][k] for k in ("student_greedy", "student_sampled")},
                             "answers": [{"prompt": r["prompt"], **r["answers"]} for r in fid["records"]]}
    return out


OWN_SAMPLE_SEEDS = (0, 1, 2)


def own_samples(teacher, model, tokenizer, batches, heldout, vocab) -> dict:
    """Metrics on the model's own continuations of the held-out prompts (first 64 tokens of each block,
    64 new tokens at temperature 1, the on-policy run's sampling), one draw per prompt per seed."""
    from distillery.config import GenerationConfig
    from distillery.evaluate import evaluate_own_samples

    per_seed = {seed: evaluate_own_samples(teacher, model, batches(heldout), tokenizer, GenerationConfig(), seed=seed,
                                           vocab_size=vocab) for seed in OWN_SAMPLE_SEEDS}
    mean = {k: sum(m[k] for m in per_seed.values()) / len(per_seed)
            for k in ("teacher_perplexity", "student_perplexity", "kl_teacher_student", "top1_agreement")}
    return {"mean_over_seeds": mean, "per_seed": per_seed}


def curves(work: Path, name: str, step0: dict | None) -> dict:
    """Training loss and validation curves from the run's metrics.jsonl (+ the step-0 point)."""
    path = work / name / "metrics.jsonl"
    recs = [json.loads(ln) for ln in path.read_text().splitlines() if ln] if path.is_file() else []
    train = [r for r in recs if "tok_s" in r]
    tokens = {r["step"]: r["tokens_seen"] for r in train}
    val = [{"step": 0, "tokens_seen": 0, **step0}] if step0 else []
    val += [{**r, "tokens_seen": tokens.get(r["step"])} for r in recs if r.get("split") == "val"]
    keep = ("step", "tokens_seen", "kl_teacher_student", "top1_agreement", "student_perplexity")
    return {"train": [{k: r.get(k) for k in ("step", "loss", "kd", "ce", "tokens_seen", "tok_s")} for r in train],
            "val": [{k: r.get(k) for k in keep} for r in val],
            "tokens_seen": train[-1]["tokens_seen"] if train else None,
            "train_tok_s": sum(r["tok_s"] for r in train[len(train) // 5:]) / max(1, len(train) - len(train) // 5) if train else None}


def tokens_to_reach(val: list[dict], target: float) -> int | None:
    """Training tokens at the first validation point with KL <= ``target`` (eval-interval granularity)."""
    return next((r["tokens_seen"] for r in val if r["kl_teacher_student"] is not None
                 and r["kl_teacher_student"] <= target), None)


def verdicts(runs: dict) -> dict:
    out = {}
    ce, kd, pr = (runs.get(n, {}) for n in ("ce_random", "kd_random", "kd_pruned"))
    if ce.get("heldout") and kd.get("heldout"):
        gain = 1 - kd["heldout"]["kl_teacher_student"] / ce["heldout"]["kl_teacher_student"]
        out["kd_vs_ce_heldout_kl_reduction"] = gain
        out["goal: KD beats CE on held-out KL by >= 30%"] = gain >= 0.30
    for prefix, off, on in (("", "kd_pruned", "kd_pruned_onpolicy"), ("jsd: ", "kd_pruned_jsd", "kd_pruned_onpolicy_jsd"),
                            ("jsd late: ", "kd_pruned_jsd", "kd_pruned_onpolicy_jsd_late")):
        pair = [runs.get(off, {}).get("own_samples"), runs.get(on, {}).get("own_samples")]
        if all(pair):  # reported, no goal set by the issue
            a, b = (o["mean_over_seeds"]["kl_teacher_student"] for o in pair)
            out[f"{prefix}onpolicy_vs_offpolicy_own_sample_kl_reduction"] = 1 - b / a
    if kd.get("curves", {}).get("val") and pr.get("curves", {}).get("val"):
        final = kd["curves"]["val"][-1]["kl_teacher_student"]
        reach = tokens_to_reach(pr["curves"]["val"], final)
        total = kd["curves"]["tokens_seen"]
        out["kd_random_final_val_kl"] = final
        out["kd_pruned_tokens_to_reach_it"] = reach
        out["kd_pruned_token_fraction"] = None if reach is None or not total else reach / total
        out["goal: pruned init reaches KD-random's final KL in <= 1/2 the tokens"] = (
            out["kd_pruned_token_fraction"] is not None and out["kd_pruned_token_fraction"] <= 0.5)
    return out


def train_info_from(paths: list[str], names: list[str]) -> dict:
    """Training records (wall seconds, recipe, the command and threads that trained it) of runs trained by
    earlier invocations, taken from their result files, so that an ``--eval-only`` merge keeps them."""
    info = {}
    for path in paths:
        res = json.loads(Path(path).read_text())
        machine = res.get("machine", {})
        for name, run in res.get("runs", {}).items():
            if name in names and "seconds" in run:
                info[name] = {"seconds": run["seconds"], "recipe": run.get("recipe"), "trained_by": {
                    "result": str(path), "command": machine.get("command"), "threads": machine.get("threads"),
                    "date": machine.get("date")}}
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 steps of 4 x 128 tokens: a smoke run, not a result")
    ap.add_argument("--size", choices=("full", "medium"), default="full", help="full: 300 x 8 x 256 tokens per run")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=2e-3, help="same for every run")
    ap.add_argument("--seed", type=int, default=0, help="train.seed of every run: the student's init and the data order")
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work-dir", default=str(common.ROOT / "runs" / "bench" / "quality"))
    ap.add_argument("--eval-only", action="store_true", help="re-evaluate finished runs, train nothing")
    ap.add_argument("--train-info", action="append", default=[], metavar="RESULT.json",
                    help="with --eval-only: keep each run's training record from the result file that trained it")
    ap.add_argument("--tasks", choices=("blimp,fidelity", "none"), default="blimp,fidelity",
                    help="BLiMP and answer fidelity for the teacher and every run (none: skip them)")
    ap.add_argument("--blimp-per-paradigm", type=int, default=10, help="BLiMP pairs per paradigm (67 paradigms)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    names = args.runs.split(",")
    if set(names) - set(RUNS + EXTRA_RUNS):
        ap.error(f"unknown run(s) {sorted(set(names) - set(RUNS + EXTRA_RUNS))}; choose from {RUNS + EXTRA_RUNS}")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    machine = common.machine_info(threads=args.threads)
    t0 = time.perf_counter()
    trained = train_info_from(args.train_info, names) if args.eval_only else train_all(args, names, work / "children.log")
    ev = evaluate_all(args, names)
    runs = {}
    tasks = ev.get("tasks") or {}
    for name in names:
        r = {**trained.get(name, {}), **ev["runs"].get(name, {}), **tasks.get("runs", {}).get(name, {}),
             "config": base_config(args, name)}
        r["curves"] = curves(work, name, ev["step0"]["pruned" if "pruned" in name else "random"])
        r["tokens_seen"] = r["curves"]["tokens_seen"]
        runs[name] = r
    machine["load_average_end"] = common.loadavg()
    first = base_config(args, names[0])
    steps, batch, seq = first["train"]["max_steps"], first["train"]["micro_batch_size"], first["data"]["seq_len"]
    params = {n: r.get("parameters") for n, r in runs.items()}
    result = {"benchmark": "quality", "quick": args.quick, "size": "quick" if args.quick else args.size, "machine": machine, "teacher": ev["teacher"],
              "student_shape": {**PRUNE, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "tied_embeddings": True},
              "size_ratio": {n: (p / ev["teacher"]["parameters"] if p else None) for n, p in params.items()},
              "step0": ev["step0"], "teacher_own_samples": ev["teacher_own_samples"],
              "teacher_tasks": tasks.get("teacher"), "blimp": tasks.get("blimp"), "fidelity_settings": tasks.get("fidelity_settings"), "runs": runs, "verdicts": verdicts(runs), "seconds": time.perf_counter() - t0,
              "limits": "one seed; CPU; validation KL on the loop's first eval_batches val batches, final metrics on the "
                        "whole held-out split; on-policy run trains on fewer target tokens per step"
                        + ("; --quick: far too few steps for the goals to mean anything" if args.quick else "")
                        + (f"; --size medium: {steps} x {batch} x {seq} tokens per run, short of the full 300 x 8 x 256"
                           if args.size == "medium" and not args.quick else "")
                        + ("; runs trained by separate invocations (each run's trained_by): their seconds are not "
                           "comparable across thread counts or machine load" if args.train_info else "")}
    common.write_json(result, Path(args.out or common.RESULTS / ("quality_quick.json" if args.quick else f"quality{'_medium' if args.size == 'medium' else ''}.json")))
    demo_schema = {"teacher": {**ev["teacher"], **(tasks.get("teacher") or {})}, "quick": args.quick, "samples": ev["samples"],
                   "blimp": tasks.get("blimp"), "fidelity_settings": tasks.get("fidelity_settings"),
                   "runs": {n: {k: r.get(k) for k in ("heldout", "milton", "parameters", "student_dir", "blimp", "fidelity")}
                            | {"train_tok_s": r["curves"]["train_tok_s"]} for n, r in runs.items()}}
    common.write_json(demo_schema, work / "results.json")
    from distillery.report import write_report

    print(f"report: {write_report(work)}")
    print(json.dumps({"size_ratio": result["size_ratio"], "verdicts": result["verdicts"],
                      "heldout_kl": {n: (r.get("heldout") or {}).get("kl_teacher_student") for n, r in runs.items()}}, indent=2))


if __name__ == "__main__":
    main()
