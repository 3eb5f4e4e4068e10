"""Train from a teacher cache vs from the live teacher, on the demo setup: write tok/s, train tok/s, quality.

    .venv/bin/python benchmarks/cache_train.py [--steps 60] [--threads 2] [--work-dir runs/bench/cache_train]

The demo recipe (``src/distillery/configs/demo.yaml``: SmolLM2-135M-Instruct teacher ``smollm2``, the
4-layer d=256 student of 15.7M parameters, ``demo:shakespeare``, seq 128, micro batch 8, forward KL at
T = 1), with ``data.max_train_blocks = steps x batch`` (one epoch of exactly the blocks the runs train on:
the cache covers those and the held-out split, nothing more), no checkpoints, no mid-run validation:

a. ``distillery cache`` writes the training and held-out splits at its default for forward KL
   (top-16 + 16 sampled-tail entries, sqrt_u8), one process; write tok/s is the writer's own
   (teacher forward + encoding + shard writes, model loading excluded) and, beside it, over the
   process's whole wall time.
b. ``distillery distill`` twice, each in its own process, same recipe, seed (so the same initial
   student), lr and steps: ``live`` (teacher.kind hf) and ``cached`` (teacher.kind cache). Train tok/s
   = tokens / seconds over the steps after the first ``--skip-steps`` (from each run's metrics.jsonl).
c. Both final students against the **live** teacher (``distillery.evaluate``): the whole held-out split
   and ``--milton-blocks`` blocks of Milton's *Paradise Lost* (never trained on): held-out KL, top-1
   agreement, perplexity. The teacher runs once per batch for both students. As a check of the
   cache-based evaluation, the cached student is also scored against the cache's held-out split, with
   the sampled tail and with the tail bucket, next to its live KL.

The machine is shared (other jobs run on its 2 cores): the load average is recorded before and after
every phase, and the number to read is the cached/live ratio from the same run, not absolute tok/s.
Writes ``benchmarks/results/cache_train.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def recipe(args) -> dict:
    """The demo recipe with this benchmark's steps, one epoch of training blocks, no checkpoints."""
    cfg = yaml.safe_load((common.ROOT / "configs" / "smollm2_student.yaml").read_text())  # the 15.8M student on Shakespeare
    batch = cfg["train"]["micro_batch_size"]
    cfg["data"]["max_train_blocks"] = args.train_blocks or args.steps * batch
    cfg["train"].update({"max_steps": args.steps, "save_every": 0, "eval_every": 0, "progress": False,
                         "seed": args.seed, "log_every": 1})
    if args.lr is not None:
        cfg["train"]["lr"] = args.lr
    if args.val_blocks is not None:
        cfg["data"]["max_val_blocks"] = args.val_blocks
    return cfg


def run_cli(cmd: list[str], args, log: Path, name: str) -> dict:
    """One ``distillery`` CLI process with ``args.threads`` threads; wall time, stdout, load before/after."""
    print(f"[cache_train] {name}: distillery {' '.join(cmd)}", flush=True)
    load0, t0 = common.loadavg(), time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "distillery.cli", *cmd], capture_output=True, text=True,
                          env=common.child_env(args.threads), cwd=common.ROOT)
    out = {"command": "distillery " + " ".join(cmd), "wall_s": round(time.perf_counter() - t0, 1),
           "load_average_before": load0, "load_average_after": common.loadavg()}
    with open(log, "a") as fh:
        fh.write(f"\n==== {name}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}\n")
    if proc.returncode != 0:
        raise SystemExit(f"[cache_train] {name} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    out["stdout"] = proc.stdout
    return out


def write_phase(args, recipe_path: Path, cache_dir: Path, log: Path) -> dict:
    shutil.rmtree(cache_dir, ignore_errors=True)
    r = run_cli(["cache", str(recipe_path), "--out", str(cache_dir), "--no-progress"], args, log, "cache")
    text = r.pop("stdout")
    summary = json.loads(text[text.index("{"):])
    man = json.loads((cache_dir / "manifest.json").read_text())
    shard_bytes = sum(s["bytes"] for s in man["shards"])
    tokens = sum(s["tokens"] for s in man["shards"])
    by_split = {sp: sum(s["tokens"] for s in man["shards"] if s["split"] == sp) for sp in man["splits"]}
    return {**r, "k_top": man.get("k_top", man["k"]), "tail": man.get("tail"), "encoding": man["encoding"],
            "tokens": tokens, "tokens_by_split": by_split, "shard_bytes": shard_bytes,
            "bytes_per_token": shard_bytes / max(tokens, 1),
            "write_tok_s": summary.get("write_tok_per_s"), "writer_seconds": summary.get("seconds"),
            "write_tok_s_whole_process": tokens / r["wall_s"]}


def train_phase(args, name: str, recipe_path: Path, out_dir: Path, overrides: list[str], log: Path) -> dict:
    shutil.rmtree(out_dir, ignore_errors=True)
    r = run_cli(["distill", str(recipe_path), f"train.output_dir={out_dir}", *overrides], args, log, name)
    r.pop("stdout")
    recs = [json.loads(ln) for ln in (out_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    steps = [x for x in recs if "tok_s" in x]
    toks = [(x["tokens_seen"] - (steps[i - 1]["tokens_seen"] if i else 0)) for i, x in enumerate(steps)]
    secs = [t / x["tok_s"] for t, x in zip(toks, steps)]  # log_every = 1: one record per step
    summary = json.loads((out_dir / "summary.json").read_text())
    return {**r, "overrides": overrides, "steps": len(steps), "tokens": sum(toks),
            "train_tok_s": common.steady_tok_s(secs, toks, args.skip_steps),
            "train_tok_s_all_steps": common.steady_tok_s(secs, toks, 0),
            "step_seconds": [round(s, 3) for s in secs],
            "kd_first": steps[0]["kd"], "kd_last": steps[-1]["kd"],
            "kd_last10_mean": sum(x["kd"] for x in steps[-10:]) / len(steps[-10:]),
            "end_of_run_validation": summary.get("validation"), "student_dir": str(out_dir / "student")}


class _Memo:
    """A live teacher whose targets are computed once per batch (both students are scored on the same batches)."""

    def __init__(self, teacher):
        self.teacher, self.seen = teacher, {}

    def targets(self, batch, vocab_size=None):
        key = tuple(batch["index"].tolist())
        if key not in self.seen:
            self.seen[key] = self.teacher.targets(batch, vocab_size=vocab_size)
        return self.seen[key]


def eval_phase(args, cfg: dict, cache_dir: Path, students: dict[str, str]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from distillery.teachers import CachedTeacher
    from distillery.config import DataConfig, RunConfig
    from distillery.data import build_datasets
    from distillery.evaluate import evaluate
    from distillery.students import check_vocab
    from distillery.teachers import load_teacher

    torch.set_num_threads(args.threads)
    load0, t0 = common.loadavg(), time.perf_counter()
    rc = RunConfig.model_validate(cfg)
    teacher = load_teacher(rc.teacher.source, device="cpu", dtype="float32")
    tok = teacher.tokenizer
    heldout = build_datasets(rc.data, tok, progress=False).val
    milton = build_datasets(DataConfig(train=["demo:milton"], seq_len=rc.data.seq_len, val_fraction=0.0,
                                       max_train_blocks=args.milton_blocks), tok, progress=False).train
    bs = rc.train.micro_batch_size
    sets = {"heldout": heldout, "milton": milton}

    def batches(name):
        ds = sets[name]
        for i in range(0, len(ds), bs):
            b = ds.batch(torch.arange(i, min(i + bs, len(ds))))
            b["index"] = b["index"] + (0 if name == "heldout" else 10 ** 9)  # the memo's key: one per set
            yield b

    def plain(name):
        ds = sets[name]
        return (ds.batch(torch.arange(i, min(i + bs, len(ds)))) for i in range(0, len(ds), bs))

    live = _Memo(teacher)
    out = {"teacher": teacher.name, "blocks": {n: len(d) for n, d in sets.items()}, "students": {}}
    for name, folder in students.items():
        student = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        vocab = check_vocab(tok, tok, teacher.model.get_output_embeddings().weight.shape[0],
                            student.get_output_embeddings().weight.shape[0])
        out["students"][name] = {s: evaluate(live, student, batches(s), vocab_size=vocab) for s in sets}
        if name == "cached":  # the cache-based estimate of the same held-out KL (no teacher forward)
            out["cache_estimate_heldout"] = {
                tail: evaluate(CachedTeacher(cache_dir, split="val", tail=tail), student, plain("heldout"),
                               vocab_size=vocab)
                for tail in ("auto", "bucket")}
    out.update(wall_s=round(time.perf_counter() - t0, 1), load_average_before=load0, load_average_after=common.loadavg())
    return out


def table(res: dict) -> str:
    c, runs, ev = res["cache"], res["runs"], res["eval"]["students"]
    lines = [f"cache write ({c['k_top']}+{(c['tail'] or {}).get('m', 0)}, {c['bytes_per_token']:.1f} B/token, "
             f"{c['tokens']} tokens): {c['write_tok_s']:.0f} tok/s (writer), {c['write_tok_s_whole_process']:.0f} "
             f"tok/s (whole process, {c['wall_s']:.0f} s)",
             f"train tok/s (steps > {res['skip_steps']}): live {runs['live']['train_tok_s']:.0f}, cached "
             f"{runs['cached']['train_tok_s']:.0f}, cached/live {res['ratio_cached_over_live']:.2f}x",
             "", f"{'student':<8} {'set':<8} {'KL':>7} {'top-1':>7} {'ppl':>9}"]
    for s in ("live", "cached"):
        for sp in ("heldout", "milton"):
            m = ev[s][sp]
            lines.append(f"{s:<8} {sp:<8} {m['kl_teacher_student']:7.4f} {m['top1_agreement']:7.4f} "
                         f"{m['student_perplexity']:9.2f}")
    est = res["eval"].get("cache_estimate_heldout")
    if est:
        lines.append(f"cached student, held-out KL from the cache: sampled tail {est['auto']['kl_teacher_student']:.4f}, "
                     f"tail bucket {est['bucket']['kl_teacher_student']:.4f} (live teacher: "
                     f"{ev['cached']['heldout']['kl_teacher_student']:.4f})")
    lines.append(f"load average: start {res['machine']['load_average']}, end {res['machine']['load_average_end']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--train-blocks", type=int, default=None, help="training blocks (default steps x micro batch)")
    ap.add_argument("--lr", type=float, default=None, help="default: the demo recipe's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-steps", type=int, default=5, help="steps left out of the steady-state tok/s")
    ap.add_argument("--milton-blocks", type=int, default=64)
    ap.add_argument("--val-blocks", type=int, default=None, help="held-out blocks (default: the recipe's max_val_blocks)")
    ap.add_argument("--work-dir", default=str(common.ROOT / "runs" / "bench" / "cache_train"))
    ap.add_argument("--out", default=str(common.RESULTS / "cache_train.json"))
    args = ap.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "children.log"
    log.write_text("")
    machine = common.machine_info(threads=args.threads)
    t0 = time.perf_counter()
    cfg = recipe(args)
    recipe_path = work / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cache_dir = work / "cache"
    cache = write_phase(args, recipe_path, cache_dir, log)
    print(f"[cache_train] cache: {cache['write_tok_s']} tok/s", flush=True)
    runs = {"live": train_phase(args, "live", recipe_path, work / "live", [], log)}
    runs["cached"] = train_phase(args, "cached", recipe_path, work / "cached",
                                 ["teacher.kind=cache", f"teacher.cache_path={cache_dir}"], log)
    ev = eval_phase(args, cfg, cache_dir, {n: r["student_dir"] for n, r in runs.items()})
    machine["load_average_end"] = common.loadavg()
    res = {"benchmark": "cache_train", "machine": machine, "recipe": cfg, "steps": args.steps,
           "skip_steps": args.skip_steps, "cache": cache, "runs": runs,
           "ratio_cached_over_live": common.ratio(runs["cached"]["train_tok_s"], runs["live"]["train_tok_s"]),
           "eval": ev, "seconds": round(time.perf_counter() - t0, 1),
           "notes": "shared 2-core CPU machine with other heavy jobs running (see the load averages per phase): "
                    "absolute tok/s are noisy, the cached/live ratio comes from one run of each, back to back. "
                    "One seed, one run per arm. The cache covers exactly the training blocks the runs see (one "
                    "epoch) plus the held-out split. Final students are scored against the live teacher; "
                    "end_of_run_validation is each run's own validation (the cached run's against the cache, "
                    "with the sampled tail), on the recipe's eval_batches only."}
    common.write_json(res, Path(args.out))
    print(table(res))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
