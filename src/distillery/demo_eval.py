"""The demo's evaluation: teacher and each student on held-out answers, Milton, BLiMP and answer fidelity.

* **held-out**: perplexity and KL(p_teacher || q_student) (nats/token, T = 1) on the assistant tokens of the
  teacher's greedy answers to the held-out prompts (Milton passages, never trained on);
* **Milton**: the same on plain *Paradise Lost* blocks;
* **BLiMP** (:mod:`.tasks.blimp`): ``per_paradigm`` pairs of each of the 67 paradigms, every sentence scored after
  ``<|endoftext|>`` (SmolLM2's document separator, what plain text follows in pretraining; its BOS
  ``<|im_start|>`` opens a chat turn and scores lower), the same prefix for teacher and students;
* **answer fidelity** (:mod:`.tasks.fidelity`): greedy and sampled answers to the held-out prompts, the
  teacher's ones generated once in the data step and reused;
* **greedy answers to more held-out prompts** (:func:`.demo_chat.more_heldout_prompts`, ``more_prompts`` of
  them, student only, no teacher needed): their distinct-2 with its standard error (:func:`.tasks.fidelity.greedy_spread`)
  over these and the fidelity prompts' greedy answers together.

Goals (issue 16), each reported met or not: BLiMP kept above chance ``(acc_s - 0.5) / (acc_t - 0.5) >= 0.9``;
the KD student's greedy answers (to all the held-out prompts: the fidelity ones and the more) never empty or
whitespace and mean distinct-2 >= 0.5; the teacher's per-byte log-likelihood of the KD student's greedy answers
closer to that of the teacher's own greedy answers than the baseline's is.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

BLIMP_PREFIX = "<|endoftext|>"
SIDE_BY_SIDE = 3  # held-out prompts shown with every model's answer
FIELDS = ("teacher_logprob_per_byte", "rouge_l", "distinct_2", "longest_repeated_ngram", "distinct_char_4",
          "repeat_share", "empty_or_whitespace")


def _blimp_lite(table: dict) -> dict:
    return {k: table[k] for k in ("overall", "per_field", "n_pairs", "n_paradigms", "prefix_token", "seconds")}


def blimp_sample(per_paradigm: int) -> tuple[list[dict], dict, str]:
    """The demo's BLiMP pairs, the key its teacher table is cached under, and that table's file name (in the
    teacher's cache folder, :func:`.demo_chat.teacher_cache`)."""
    from .demo_chat import keyed_name
    from .tasks.blimp import load_pairs

    pairs = load_pairs(per_paradigm=per_paradigm, seed=0)
    key = {"per_paradigm": per_paradigm, "seed": 0, "prefix": BLIMP_PREFIX,
           "pairs": hashlib.sha256(json.dumps([[p["good"], p["bad"]] for p in pairs]).encode()).hexdigest()}
    return pairs, key, keyed_name("blimp", key) + ".json"


def teacher_blimp_cached(cache: Path, per_paradigm: int) -> bool:
    """Whether the teacher's table for this sample is already in ``cache`` (the evaluation then skips scoring it)."""
    _, key, name = blimp_sample(per_paradigm)
    try:
        return json.loads((cache / name).read_text()).get("key") == key
    except (OSError, ValueError, AttributeError):  # missing, torn, or not a table
        return False


def teacher_blimp(model, tok, pairs, path: Path, key: dict) -> dict:
    """The teacher's BLiMP table, computed once per teacher and ``key`` (pairs, prefix) and kept in ``path``."""
    from .tasks.blimp import score_blimp

    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached["table"]
    table = score_blimp(model, tok, pairs, prefix=BLIMP_PREFIX, name="teacher")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"key": key, "table": table}) + "\n")
    tmp.replace(path)  # a demo killed mid-write leaves no half file for the next one
    return table


def goals(teacher: dict, runs: dict) -> dict:
    """The issue's three goals on the KD student (``runs['kd']``) against the teacher and the CE baseline."""
    from .tasks.blimp import retained_above_chance

    kd, ce = runs.get("kd", {}), runs.get("ce", {})
    out = {}
    kept = retained_above_chance(kd["blimp"]["overall"], teacher["blimp"]["overall"]) if kd.get("blimp") else None
    out["blimp_kept_above_chance"] = kept
    out["goal: BLiMP kept above chance >= 0.9"] = kept is not None and kept >= 0.9
    g = (kd.get("fidelity") or {}).get("student_greedy")
    if g:
        out["kd_greedy_distinct_2_fidelity_prompts"] = g["distinct_2"]
    # the goal reads all the held-out prompts' greedy answers (fidelity's and the more prompts'); results written
    # before those existed carry the fidelity prompts' only
    w = kd.get("greedy_all_heldout") or (g and {
        "answers": None, "distinct_2": g["distinct_2"], "distinct_2_stderr": None,
        "distinct_2_min": kd["fidelity"].get("student_greedy_distinct_2_min"), "empty_or_whitespace": g["empty_or_whitespace"]})
    if w:
        out |= {"kd_greedy_prompts": w["answers"], "kd_greedy_empty": w["empty_or_whitespace"],
                "kd_greedy_distinct_2": w["distinct_2"], "kd_greedy_distinct_2_stderr": w["distinct_2_stderr"],
                "kd_greedy_distinct_2_min": w["distinct_2_min"]}
        out["goal: greedy answers never empty, distinct-2 >= 0.5"] = (
            w["empty_or_whitespace"] == 0 and w["distinct_2"] is not None and w["distinct_2"] >= 0.5)
    ref = (teacher.get("fidelity") or {}).get("teacher_greedy", {}).get("teacher_logprob_per_byte")
    lls = {n: (r.get("fidelity") or {}).get("student_greedy", {}).get("teacher_logprob_per_byte") for n, r in runs.items()}
    if ref is not None and lls.get("kd") is not None and lls.get("ce") is not None:
        out["teacher_ll_per_byte"] = {"teacher_greedy": ref, **lls}
        out["goal: KD answers closer to the teacher's log-likelihood than CE's"] = abs(lls["kd"] - ref) < abs(lls["ce"] - ref)
    return out


def paired_difference(a: list, b: list) -> dict | None:
    """Mean of ``a_i - b_i`` over the prompts both scored, its standard error and how many: how far apart the two
    students' log-likelihoods are beside how much a dozen prompts can tell (None under two pairs)."""
    import statistics

    d = [x - y for x, y in zip(a, b) if x is not None and y is not None]
    if len(d) < 2:
        return None
    return {"mean": statistics.mean(d), "stderr": statistics.stdev(d) / len(d) ** 0.5, "prompts": len(d)}


class RememberedTeacher:
    """A teacher whose targets for a batch are computed once and kept: the demo measures both students on the same
    few held-out and Milton blocks (under 20, ~0.6 MB of hidden states each), so the second pays nothing for it.
    Keyed by the batch's token ids and labels (the targets' mask); nothing else of the teacher is used there."""

    def __init__(self, teacher):
        self.teacher, self.kept = teacher, {}

    def targets(self, batch: dict, vocab_size: int | None = None):
        key = (batch["input_ids"].cpu().numpy().tobytes(), batch["labels"].cpu().numpy().tobytes(), vocab_size)
        if key not in self.kept:
            self.kept[key] = self.teacher.targets(batch, vocab_size=vocab_size)
        return self.kept[key]


def evaluate_demo(out: Path, runs: dict, data: dict, s: dict, console: Console, *, quick: bool) -> dict:
    """Load the teacher and both students, measure everything the module docstring lists; returns results."""
    from transformers import AutoModelForCausalLM

    from .config import DataConfig
    from .data import build_datasets
    from .demo_chat import more_heldout_prompts, teacher_cache
    from .evaluate import evaluate
    from .students import count_parameters
    from .tasks.blimp import CREDIT
    from .tasks.fidelity import generate_answers, greedy_spread, score_fidelity
    from .teachers import load_teacher
    from .train import collate

    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = load_teacher("smollm2", device=str(device), dtype="float32")  # fp32 everywhere: same numbers
    tok = teacher.tokenizer
    cfg = runs["kd"]["cfg"]
    bs = max(4, cfg.train.micro_batch_size)  # the recipe's 2-block steps made these batches 12 s slower
    held = build_datasets(DataConfig(train=[data["heldout_chat"]], seq_len=cfg.data.seq_len, val_fraction=0.0),
                          tok, progress=False).train
    milton = build_datasets(DataConfig(train=["demo:milton"], seq_len=cfg.data.seq_len, val_fraction=0.0,
                                       max_train_blocks=s["milton_blocks"]), tok, progress=False).train

    def batches(ds):
        return (collate(ds, torch.arange(i, min(i + bs, len(ds)))) for i in range(0, len(ds), bs))

    pairs, key, table_name = blimp_sample(s["blimp_per_paradigm"])
    console.print(f"BLiMP: {len(pairs)} pairs ({s['blimp_per_paradigm']} per paradigm), teacher ...", highlight=False)
    cache = teacher_cache(teacher)  # the teacher's table is a pure function of it: every demo shares it
    t_blimp = teacher_blimp(teacher.model, tok, pairs, cache / table_name, key)
    given = {"teacher_greedy": data["heldout_greedy"], "teacher_sampled": data["heldout_sampled"]}
    given_ll = None  # the teacher's log-likelihoods of its own answers: scored with the first student, then kept
    results = {"teacher": {"name": teacher.name, "parameters": count_parameters(teacher.model),
                           "blimp": _blimp_lite(t_blimp)},
               "init": "both students start from the same student pruned from the teacher (pruned_init/)",
               "data": {k: data[k] for k in ("n_train_conversations", "n_heldout_conversations", "system_prompt")}
               | {"train_answers": data.get("train_decoding")}
               | {"train_files": data["train_files"], "plain_chars": s["plain_chars"],
                  "answer_tokens": s["answer_tokens"],
                  "weights": dict(cfg.data.weights)},  # data.weights: the conversations' weight
               "runs": {}, "samples": []}
    fid_records = None
    more_p = more_heldout_prompts(s.get("more_prompts", 0), data["heldout_prompts"])
    more_records = [{"prompt": p} for p in more_p]
    remembered = RememberedTeacher(teacher)  # both students are measured on the same batches
    for name in runs:
        folder = out / name / "student"
        console.print(f"evaluating the {name.upper()} student ...", highlight=False)
        student = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
        vocab = min(student.config.vocab_size, teacher.vocab_width)
        from .tasks.blimp import score_blimp

        sb = score_blimp(student, tok, pairs, prefix=BLIMP_PREFIX, name=name)
        fid = score_fidelity(teacher.model, tok, student, tok, data["heldout_prompts"], max_new_tokens=s["answer_tokens"],
                             teacher_answers=given, teacher_ll=given_ll, batch_size=8)
        given_ll = {k: [rec["scores"][k]["teacher_logprob_per_byte"] for rec in fid["records"]] for k in given}
        greedy_d2 = [r["scores"]["student_greedy"]["distinct_2"] for r in fid["records"]]
        more = generate_answers(student, tok, more_p, do_sample=False, max_new_tokens=s["answer_tokens"], batch_size=32)
        for rec, a in zip(more_records, more):
            rec[f"{name}_greedy"] = a
        r = runs[name]
        results["runs"][name] = {
            "student_dir": str(folder), "parameters": count_parameters(student), "size_bytes": sum(
                f.stat().st_size for f in folder.glob("*.safetensors")),
            "heldout": evaluate(remembered, student, batches(held), vocab_size=vocab),
            "milton": evaluate(remembered, student, batches(milton), vocab_size=vocab),
            "train_tok_s": r["train_tok_s"], "seconds": r["seconds"], "reused": r["reused"],
            "steps": r["cfg"].train.max_steps, "tokens": r["tokens"], "blimp": _blimp_lite(sb),
            "fidelity": {"student_greedy": fid["means"]["student_greedy"], "student_sampled": fid["means"]["student_sampled"],
                         "student_greedy_distinct_2_min": min((d for d in greedy_d2 if d is not None), default=None)},
            "greedy_all_heldout": greedy_spread([rec["answers"]["student_greedy"] for rec in fid["records"]] + more)}
        results["teacher"]["fidelity"] = {k: fid["means"][k] for k in ("teacher_greedy", "teacher_sampled")}
        results["fidelity_settings"] = fid["settings"]
        if fid_records is None:
            fid_records = [{"prompt": rec["prompt"], "teacher_greedy": rec["answers"]["teacher_greedy"],
                            "teacher_sampled": rec["answers"]["teacher_sampled"]} for rec in fid["records"]]
        for i, rec in enumerate(fid["records"]):
            fid_records[i][f"{name}_greedy"] = rec["answers"]["student_greedy"]
            fid_records[i][f"{name}_sampled"] = rec["answers"]["student_sampled"]
            fid_records[i][f"{name}_scores"] = rec["scores"]["student_greedy"]
            if i < SIDE_BY_SIDE:
                results["samples"].append({"prompt": rec["prompt"], "teacher": rec["answers"]["teacher_greedy"],
                                           "student": rec["answers"]["student_greedy"], "student_run": name,
                                           "decoding": "greedy, chat template, stops at the end of turn"})
        del student
    t_held = results["runs"]["kd"]["heldout"]
    results["teacher"]["heldout_perplexity"] = t_held["teacher_perplexity"]
    results["teacher"]["milton_perplexity"] = results["runs"]["kd"]["milton"]["teacher_perplexity"]
    results["answers"] = fid_records
    results["more_answers"] = more_records  # greedy only: the answer goal's other prompts
    results["blimp"] = {"per_paradigm": s["blimp_per_paradigm"], "n_pairs": len(pairs), "prefix": BLIMP_PREFIX,
                        "chance": 0.5, "credit": CREDIT}
    results["goals"] = goals(results["teacher"], results["runs"])
    results["goals"]["teacher_ll_kd_minus_ce"] = paired_difference(
        [(r.get("kd_scores") or {}).get("teacher_logprob_per_byte") for r in fid_records],
        [(r.get("ce_scores") or {}).get("teacher_logprob_per_byte") for r in fid_records])
    results["eval_seconds"] = time.perf_counter() - t0
    return results


def _f(v, fmt="{:.3f}"):
    return "-" if v is None else fmt.format(v)


def print_results(results: dict, console: Console) -> None:
    """The console's view of ``results``: one table of scores, three answers side by side, the goals."""
    t, runs = results["teacher"], results["runs"]
    table = Table(title=f"{t['name']} -> pruned student; {runs['kd'].get('tokens') or 0:,} training tokens each")
    for col in ("model", "params", "held-out ppl", "KL held-out", "Milton ppl", "KL Milton", "BLiMP"):
        table.add_column(col, justify="right")
    answers = Table(title=f"Answers to {results['fidelity_settings']['n_prompts']} held-out prompts (greedy; means)")
    for col in ("model", "teacher LL/byte", "ROUGE-L", "distinct-2", "char 4-grams", "repeat share", "empty"):
        answers.add_column(col, justify="right")
    tg = t["fidelity"]["teacher_greedy"]
    table.add_row("teacher", f"{t['parameters'] / 1e6:.1f}M", _f(t["heldout_perplexity"], "{:.2f}"), "0",
                  _f(t["milton_perplexity"], "{:.2f}"), "0", _f(t["blimp"]["overall"], "{:.1%}"))
    answers.add_row("teacher", _f(tg["teacher_logprob_per_byte"]), "1", _f(tg["distinct_2"]), _f(tg["distinct_char_4"]),
                    _f(tg["repeat_share"]), str(tg["empty_or_whitespace"]))
    for name, label in (("kd", "KD student"), ("ce", "CE student")):
        r = runs[name]
        g = r["fidelity"]["student_greedy"]
        table.add_row(label, f"{r['parameters'] / 1e6:.1f}M", _f(r["heldout"]["student_perplexity"], "{:.2f}"),
                      _f(r["heldout"]["kl_teacher_student"]), _f(r["milton"]["student_perplexity"], "{:.2f}"),
                      _f(r["milton"]["kl_teacher_student"]), _f(r["blimp"]["overall"], "{:.1%}"))
        answers.add_row(label, _f(g["teacher_logprob_per_byte"]), _f(g["rouge_l"]), _f(g["distinct_2"]),
                        _f(g["distinct_char_4"]), _f(g["repeat_share"]), str(g["empty_or_whitespace"]))
    console.print(table)
    console.print(f"[dim]BLiMP: {results['blimp']['n_pairs']} pairs after {results['blimp']['prefix']}, chance 50%[/]")
    console.print(answers)
    n_more = len(results.get("more_answers") or [])
    for name, label in (("kd", "KD student"), ("ce", "CE student")):
        w = runs[name].get("greedy_all_heldout")
        if w and n_more:
            console.print(f"{label}: distinct-2 of its greedy answers to all {w['answers']} held-out prompts (these "
                          f"{w['answers'] - n_more} and {n_more} more) " + (
                              f"{_f(w['distinct_2'])} +- {_f(w['distinct_2_stderr'])}, lowest {_f(w['distinct_2_min'])}"
                              if w["scored"] else "- (no answer of two words)") + f", empty {w['empty_or_whitespace']}",
                          highlight=False)
    console.print(f"[dim]{results['blimp']['credit']}[/]")
    console.rule("[bold]Held-out prompts, greedy answers[/]")
    for rec in results["answers"][:SIDE_BY_SIDE]:
        console.print(f"[bold]prompt:[/] {rec['prompt']!r}", highlight=False)
        for who in ("teacher", "kd", "ce"):
            console.print(f"  [bold]{who}[/]: {rec.get(f'{who}_greedy', '')!r}", highlight=False)
    g = results["goals"]
    said = {"goal: greedy answers never empty, distinct-2 >= 0.5":  # each goal's numbers beside its verdict
            f" (on {g.get('kd_greedy_prompts')} held-out prompts: {_f(g.get('kd_greedy_distinct_2'))})",
            "goal: BLiMP kept above chance >= 0.9": f" ({_f(g.get('blimp_kept_above_chance'), '{:.2f}')})"}
    if (d := g.get("teacher_ll_kd_minus_ce")):
        said["goal: KD answers closer to the teacher's log-likelihood than CE's"] = (
            f" (KD - CE: {d['mean']:+.3f} +- {d['stderr']:.3f} nats/byte over {d['prompts']} prompts)")
    for k, v in g.items():
        if k.startswith("goal:"):
            console.print(f"{'[green]met[/]' if v else '[red]not met[/]'}  {k[6:]}{said.get(k, '')}", highlight=False)
