"""``distillery demo``: SmolLM2-135M-Instruct → a ~16M student on Shakespeare, end to end, with proof.

Two runs of the same student architecture for the same number of tokens:

* **KD**: forward KL to the live teacher (``kd_weight=1, ce_weight=0``),
* **CE**: the usual next-token cross-entropy only (``kd_weight=0, ce_weight=1``), the baseline.

Both are evaluated against the teacher on the held-out Shakespeare split and on Milton's *Paradise
Lost* (never trained on), saved as plain Hugging Face folders, and compared in a table; then the
same prompt is answered by teacher and student. Results land in ``<output_dir>/results.json`` and
``results.md``.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from .config import load_config
from .evaluate import write_json

QUICK = ["train.max_steps=40", "train.micro_batch_size=4", "train.save_every=0", "data.max_val_blocks=16",
         "train.warmup_steps=5"]
PROMPT = "To be, or not to be"


def _dir_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.suffix == ".safetensors")


def _sample(model, tokenizer, text: str, new_tokens: int) -> tuple[str, float]:
    """Greedy continuation with the KV cache; returns (text, decode tokens/s)."""
    ids = tokenizer(text, return_tensors="pt").to(model.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        # greedy, but no 3-gram twice: small students otherwise loop on one token ("the the the ...")
        out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False, no_repeat_ngram_size=3,
                             pad_token_id=tokenizer.pad_token_id)
    dt = time.perf_counter() - t0
    gen = out[0, ids["input_ids"].shape[1]:]
    return tokenizer.decode(gen, skip_special_tokens=True), len(gen) / dt


def run_demo(quick: bool = False, output_dir: str = "runs/demo", overrides: list[str] | None = None) -> dict:
    from .evaluate import evaluate
    from .students import count_parameters
    from .train import collate, distill
    from .run_setup import prepare_run

    console = Console()
    out = Path(output_dir)
    recipe = resources.files("distillery") / "configs" / "demo.yaml"
    base = (QUICK if quick else []) + list(overrides or [])
    started = time.perf_counter()
    runs = {}
    for name, extra in (("kd", ["loss.kd_weight=1.0", "loss.ce_weight=0.0"]),
                        ("ce", ["loss.kd_weight=0.0", "loss.ce_weight=1.0"])):
        cfg = load_config(str(recipe), base + extra + [f"train.output_dir={out / name}"])
        console.rule(f"[bold]{name.upper()} run[/]: {cfg.train.max_steps} steps x "
                     f"{cfg.train.micro_batch_size * cfg.train.grad_accum} x {cfg.data.seq_len} tokens")
        resume = (out / name / "checkpoints").is_dir()
        t0 = time.perf_counter()
        distill(cfg, resume=resume)
        metrics = [json.loads(ln) for ln in (out / name / "metrics.jsonl").read_text().splitlines() if ln]
        train_steps = [m for m in metrics if "tok_s" in m]
        steady = train_steps[len(train_steps) // 5:] or train_steps
        runs[name] = {"cfg": cfg, "seconds": time.perf_counter() - t0,
                      "train_tok_s": sum(m["tok_s"] for m in steady) / max(len(steady), 1)}

    console.rule("[bold]Evaluation[/] (held-out Shakespeare split, and Milton's Paradise Lost)")
    cfg = runs["kd"]["cfg"]
    # evaluate where training ran (a GPU if there is one); the teacher in fp32 there too, so the
    # table's numbers do not depend on where they were measured
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = prepare_run(cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"dtype": "float32"})}),
                      device=device)
    teacher = run.teacher
    from .data import build_datasets
    from .config import DataConfig

    milton = build_datasets(DataConfig(train=["demo:milton"], seq_len=cfg.data.seq_len, val_fraction=0.0,
                                       max_train_blocks=cfg.data.max_val_blocks), run.tokenizer).train

    def batches(ds):
        bs = cfg.train.micro_batch_size
        return (collate(ds, torch.arange(i, min(i + bs, len(ds)))) for i in range(0, len(ds), bs))

    from transformers import AutoModelForCausalLM

    results = {"teacher": {"name": teacher.name, "parameters": count_parameters(teacher.model)}, "runs": {}}
    for name in ("kd", "ce"):
        folder = out / name / "student"
        student = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
        held = evaluate(teacher, student, batches(run.val), vocab_size=run.vocab_size)
        other = evaluate(teacher, student, batches(milton), vocab_size=run.vocab_size)
        results["runs"][name] = {"student_dir": str(folder), "parameters": count_parameters(student),
                                 "size_bytes": _dir_size(folder), "heldout": held, "milton": other,
                                 "train_tok_s": runs[name]["train_tok_s"], "seconds": runs[name]["seconds"],
                                 "steps": cfg.train.max_steps,
                                 "tokens": cfg.train.max_steps * cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.data.seq_len}
    kd = results["runs"]["kd"]

    table = Table(title=f"{teacher.name} → student (same tokens for both students; "
                        f"{kd['tokens']:,} training tokens each)")
    for col in ("model", "params", "size", "held-out ppl", "KL(T‖S) held-out", "top-1 agree", "Milton ppl",
                "KL(T‖S) Milton", "train tok/s"):
        table.add_column(col, justify="right")
    t_held = kd["heldout"]
    table.add_row(f"teacher {teacher.name}", f"{results['teacher']['parameters'] / 1e6:.1f}M", "-",
                  f"{t_held['teacher_perplexity']:.2f}", "0", "1.000", f"{kd['milton']['teacher_perplexity']:.2f}", "0", "-")
    for name, label in (("kd", "student, KD (forward KL)"), ("ce", "student, CE only")):
        r = results["runs"][name]
        table.add_row(label, f"{r['parameters'] / 1e6:.1f}M", f"{r['size_bytes'] / 1e6:.0f} MB",
                      f"{r['heldout']['student_perplexity']:.2f}", f"{r['heldout']['kl_teacher_student']:.3f}",
                      f"{r['heldout']['top1_agreement']:.3f}", f"{r['milton']['student_perplexity']:.2f}",
                      f"{r['milton']['kl_teacher_student']:.3f}", f"{r['train_tok_s']:.0f}")
    console.print(table)

    student = AutoModelForCausalLM.from_pretrained(out / "kd" / "student", dtype=torch.float32).to(device).eval()
    new = 24 if quick else 40
    t_text, t_speed = _sample(teacher.model, run.tokenizer, PROMPT, new)
    s_text, s_speed = _sample(student, run.tokenizer, PROMPT, new)
    console.rule("[bold]Same prompt, greedy (no repeated 3-grams)[/]")
    console.print(f"[bold]prompt:[/] {PROMPT}")
    console.print(f"[bold]teacher[/] ({t_speed:.0f} tok/s): {t_text!r}")
    console.print(f"[bold]student[/] ({s_speed:.0f} tok/s): {s_text!r}")
    results["sample"] = {"prompt": PROMPT, "teacher": t_text, "student": s_text,
                         "teacher_decode_tok_s": t_speed, "student_decode_tok_s": s_speed}
    results["quick"] = quick
    results["seconds"] = time.perf_counter() - started
    write_json(results, out / "results.json")
    verdict = ("KD beats CE on held-out KL to the teacher" if kd["heldout"]["kl_teacher_student"]
               < results["runs"]["ce"]["heldout"]["kl_teacher_student"] else "CE matched or beat KD on held-out KL")
    console.print(f"{verdict}. Students saved under {out}/kd/student and {out}/ce/student; "
                  f"results in {out}/results.json ({results['seconds']:.0f} s).")
    from .report import write_report  # curves, tables and the sample as one HTML page, from the JSON above

    console.print(f"Report: {write_report(out)}")
    return results
