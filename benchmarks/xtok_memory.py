"""Where a cross-tokenizer run's memory goes, step by step, and why shapes matter.

    python benchmarks/xtok_memory.py run [--steps 80] [--set train.return_large_frees=true] [--unstable-shapes]
    python benchmarks/xtok_memory.py shapes [--calls 80]

``run``: the ``exact_kl`` arm of ``benchmarks/cross_tokenizer.py --init pruned`` (SmolLM2-135M-Instruct -> the pruned
GPT-2-vocabulary student of ``runs/bench/xtok_pruned``, which that benchmark writes; 4 x 128 tokens, bf16, 2 threads)
with the process's resident set sampled every 20 ms: the largest RSS of each step (from one loss call to the next),
of each part of a step over the second half of the run (``loss``, ``backward``, ``optimizer``, and ``forwards``:
the next batch, the student's and the teacher's forward), of the phases after the last step (checkpoint,
validation), and tok/s per step. ``--unstable-shapes`` switches the
padding below off, for the A/B.

``shapes``: the resident set after every 10 of ``--calls`` calls of (a) the teacher's forward (no grad) on 4 rows of
random length 120-160 against a fixed 160, and (b) the fused cross-tokenizer loss with CE folded in, at 400-500 rows
against a fixed 460, with its matmul rows rounded up to 8 (``xtok.fused.ROW_MULTIPLE``) and without (1). Every new
shape used to leave memory behind; this is the measurement behind the padding in ``xtok.batch`` and ``xtok.fused``.
Results: ``benchmarks/results/xtok_memory_<mode>.json``.
"""

from __future__ import annotations

import argparse
import bisect
import json
import random
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def rss_gb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1e6
    return 0.0


def run_mode(args) -> dict:
    """Per-step peak RSS of the exact_kl arm (module doc)."""
    import torch

    from distillery import train
    from distillery.config import RunConfig
    from distillery.xtok import batch

    samples, marks = [], []

    def sample() -> None:
        while True:
            samples.append((time.time(), rss_gb()))
            time.sleep(0.02)
    threading.Thread(target=sample, daemon=True).start()
    loss = batch.CrossTokenizer.loss

    def marked_loss(self, *a, **k):
        marks.append((time.time(), "step"))
        out = loss(self, *a, **k)
        marks.append((time.time(), "after loss"))  # the rest of the step: backward, then the optimizer
        return out
    batch.CrossTokenizer.loss = marked_loss
    opt_step = torch.optim.AdamW.step

    def marked_step(self, *a, **k):
        marks.append((time.time(), "optimizer"))
        out = opt_step(self, *a, **k)
        marks.append((time.time(), "after optimizer"))  # the next step's data, student and teacher forwards
        return out
    torch.optim.AdamW.step = marked_step
    for name in ("save_checkpoint", "_validate"):
        fn = getattr(train, name)

        def marked(*a, _fn=fn, _name=name, **k):
            marks.append((time.time(), _name))
            return _fn(*a, **k)
        setattr(train, name, marked)
    init = str(Path(args.work_dir) / "init_pruned_demo_gpt2")
    out = Path(args.work_dir) / "runs" / "memory_exact_kl"
    shutil.rmtree(out, ignore_errors=True)
    r = {"teacher": {"source": "smollm2", "dtype": "bfloat16"},
         "student": {"init": "pretrained", "pretrained": init, "tokenizer": init},
         "data": {"train": [str(Path(args.work_dir) / "train.jsonl")],
                  "validation": [str(Path(args.work_dir) / "heldout.jsonl")], "seq_len": 128,
                  "max_train_blocks": args.steps * 4, "max_val_blocks": 4, "seed": 0},
         "loss": {"kd_weight": 1.0, "ce_weight": 1.0, "xtok_method": "exact_kl", "xtok_span_weight": 1.0},
         "train": {"output_dir": str(out), "max_steps": args.steps, "micro_batch_size": 4, "lr": 2e-3,
                   "warmup_steps": max(1, args.steps // 10), "eval_every": 0, "eval_batches": 1, "save_every": 0,
                   "log_every": 1, "progress": False, "seed": 0, "mixed_precision": "bf16"}}
    # the same --set SECTION.KEY=VALUE as that benchmark's arms
    from cross_tokenizer import with_overrides

    r = with_overrides(r, args.set)
    if args.unstable_shapes:  # the A/B of the padding: teacher batches and loss matmuls at their natural sizes
        from distillery.xtok import fused
        batch.LENGTH_MULTIPLE = fused.ROW_MULTIPLE = 1
    torch.set_num_threads(args.threads)
    train.distill(RunConfig.model_validate(r))
    time.sleep(0.1)
    torch.optim.AdamW.step = opt_step
    steps = [t for t, n in marks if n == "step"]
    per_step: dict[int, float] = {}
    for t, m in samples:
        i = bisect.bisect_right(steps, t)
        if 1 <= i <= len(steps):
            per_step[i] = max(per_step.get(i, 0.0), m)
    # each phase's largest RSS over the second half of the steps: where in a step the peak sits
    half = steps[len(steps) // 2] if steps else 0.0
    phases: dict[str, float] = {}
    inner = [(t, n) for t, n in marks if n in ("step", "after loss", "optimizer", "after optimizer")]
    for (ta, n), (tb, _) in zip(inner, inner[1:]):
        if ta >= half:
            name = {"step": "loss", "after loss": "backward", "optimizer": "optimizer",
                    "after optimizer": "forwards"}[n]
            peak = max((m for t, m in samples if ta <= t < tb), default=0.0)
            phases[name] = round(max(phases.get(name, 0.0), peak), 3)
    after = [(t, n) for t, n in marks if t >= steps[-1] and n in ("step", "save_checkpoint", "_validate")]
    after += [(time.time(), "end")]  # the last step, then each phase
    end = {("last step" if n == "step" else n): max((m for t, m in samples if ta <= t < tb), default=None)
           for (ta, n), (tb, _) in zip(after, after[1:])}
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out, ignore_errors=True)
    return {"recipe": r, "per_step_peak_rss_gb": [round(per_step.get(i, 0.0), 3) for i in range(1, len(steps) + 1)],
            "peak_rss_gb_from_phase": end, "step_phase_peak_rss_gb": phases, "vmhwm_gb": common.peak_rss_bytes() / 1e9,
            "tok_s": [round(x["tok_s"], 1) for x in recs if "tok_s" in x]}


def shapes_mode(args) -> dict:
    """RSS growth with varying shapes (module doc), each probe in its own process."""
    out = {}
    for probe in ("teacher_varying", "teacher_fixed", "loss_varying_round8", "loss_fixed_round8",
                  "loss_varying_round1"):
        res = common.run_child(Path(__file__), {"probe": probe, "calls": args.calls}, threads=args.threads,
                               log=Path("/tmp/xtok_memory_children.log"), timeout=1800)
        out[probe] = res
        print(probe, res.get("rss_gb"), flush=True)
    return out


def child(spec: dict) -> dict:
    import torch

    probe, calls = spec["probe"], spec["calls"]
    rnd = random.Random(0)
    trace = []
    if probe.startswith("teacher"):
        from distillery.teachers import load_teacher

        model = load_teacher("smollm2", dtype="bfloat16").model
        with torch.no_grad():
            for i in range(1, calls + 1):
                n = 160 if probe.endswith("fixed") else rnd.randint(120, 160)
                model.base_model(input_ids=torch.randint(0, 49000, (4, n)))
                if i % 10 == 0:
                    trace.append(round(rss_gb(), 3))
        return {"rss_gb": trace}
    from distillery.xtok import fused

    fused.ROW_MULTIPLE = 8 if probe.endswith("round8") else 1
    vs, vt, h_s, h_t, m = 50257, 49152, 384, 576, 36000  # the GPT-2 student and SmolLM2's head
    w = torch.randn(vs, h_s) * 0.02
    wt = (torch.randn(vt, h_t) * 0.02).bfloat16()
    perm, t_perm = torch.randperm(vs), torch.randperm(vt)
    for i in range(1, calls + 1):
        n = 460 if "fixed" in probe else rnd.randint(400, 500)
        n_kd = n - (60 if "fixed" in probe else rnd.randint(40, 80))
        h = torch.randn(n, h_s, requires_grad=True)
        th = torch.randn(n_kd, h_t).bfloat16()
        weight = w.clone().requires_grad_(True)

        def dense(lo, hi, th=th):
            return torch.nn.functional.linear(th[lo:hi], wt).index_select(1, t_perm)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plan = fused.FusedPlan("exact_kl", 1.0, vs, m, 64, perm=perm, dense_rows=dense,
                                   head_dtype=torch.bfloat16, n_kd=n_kd, ce_cols=torch.randint(0, vs, (n,)),
                                   ce_lambda=1.0)
            values = fused.fused_rows(h, weight, None, plan)
        values.sum().backward()
        if i % 10 == 0:
            trace.append(round(rss_gb(), 3))
    return {"rss_gb": trace}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", nargs="?", choices=("run", "shapes"), default="run")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--calls", type=int, default=80)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--unstable-shapes", action="store_true",
                    help="run: no padding of teacher batches (xtok.batch.LENGTH_MULTIPLE) or loss matmul rows "
                         "(xtok.fused.ROW_MULTIPLE), as before they were added")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work-dir", default=str(common.ROOT / "runs" / "bench" / "xtok_pruned"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # one shapes probe in its own process (common.run_child)
        Path(args.result).write_text(json.dumps(child(json.loads(Path(args.child).read_text()))))
        return
    load0 = common.loadavg()
    res = run_mode(args) if args.mode == "run" else shapes_mode(args)
    doc = {"benchmark": f"xtok_memory_{args.mode}", "machine": common.machine_info(sys.argv, args.threads),
           "load_average_start": load0, "load_average_end": common.loadavg(), "result": res}
    path = Path(args.out or common.RESULTS / f"xtok_memory_{args.mode}.json")
    common.write_json(doc, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
