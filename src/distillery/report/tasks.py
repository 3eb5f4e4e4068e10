"""The report's task section: BLiMP and answer fidelity for teacher and students, and the demo's goals.

Read from ``results.json`` (``distillery demo``, ``benchmarks/quality.py``): ``teacher.blimp`` /
``runs.<name>.blimp`` (``overall``, ``per_field``), ``teacher.fidelity`` (``teacher_greedy``,
``teacher_sampled`` means) / ``runs.<name>.fidelity`` (``student_greedy``, ``student_sampled`` means),
``runs.<name>.greedy_all_heldout`` (distinct-2 over all the held-out prompts' greedy answers), ``blimp``
(settings and the credit line) and ``goals``. A results file without them renders nothing here.
"""

from __future__ import annotations

from .cells import esc, num, table

FID_COLS = (("teacher_logprob_per_byte", "teacher LL / byte", "{:.3f}"), ("rouge_l", "ROUGE-L vs teacher", "{:.3f}"),
            ("distinct_2", "distinct-2", "{:.3f}"), ("longest_repeated_ngram", "longest repeat (words)", "{:.1f}"),
            ("distinct_char_4", "distinct char 4-grams", "{:.3f}"), ("repeat_share", "repeat share (chars)", "{:.3f}"),
            ("empty_or_whitespace", "empty", "{:d}"))


def _blimp(results: dict) -> str:
    teacher, runs = results.get("teacher") or {}, results.get("runs") or {}
    rows_src = ([("teacher", teacher["blimp"])] if teacher.get("blimp") else []) + [
        (n, r["blimp"]) for n, r in runs.items() if r.get("blimp")]
    if not rows_src:
        return ""
    fields = sorted({f for _, b in rows_src for f in b.get("per_field", {})})
    t_acc = (teacher.get("blimp") or {}).get("overall")
    head = ["model", "overall", "kept above chance"] + fields
    rows = []
    for name, b in rows_src:
        kept = None if name == "teacher" or t_acc is None or t_acc <= 0.5 else (b["overall"] - 0.5) / (t_acc - 0.5)
        rows.append([esc(name), num(b["overall"], "{:.1%}"), "–" if name == "teacher" else num(kept, "{:.2f}")]
                    + [num(b.get("per_field", {}).get(f), "{:.1%}") for f in fields])
    info = results.get("blimp") or {}
    note = (f"{info.get('n_pairs', '?')} pairs ({info.get('per_paradigm', '?')} per paradigm), each sentence scored "
            f"after {esc(info.get('prefix', 'the BOS'))}; chance 50%; kept above chance = (acc − 0.5) / (acc_teacher − 0.5). "
            f"{esc(info.get('credit', ''))}")
    return "<h3>BLiMP (grammatical vs ungrammatical minimal pairs)</h3>" + table(head, rows) + f"<p class='note'>{note}</p>"


def _fidelity(results: dict) -> str:
    teacher, runs = results.get("teacher") or {}, results.get("runs") or {}
    rows_src = [(f"teacher ({k.split('_')[1]})", m) for k, m in (teacher.get("fidelity") or {}).items()]
    for n, r in runs.items():
        rows_src += [(f"{n} ({k.split('_')[1]})", m) for k, m in (r.get("fidelity") or {}).items()
                     if isinstance(m, dict)]
    if not rows_src:
        return ""
    head = ["answers", *(label for _, label, _ in FID_COLS)]
    rows = [[esc(name)] + [num(m.get(k), fmt) for k, _, fmt in FID_COLS] for name, m in rows_src]
    s = results.get("fidelity_settings") or {}
    note = (f"{s.get('n_prompts', '?')} held-out prompts, at most {s.get('max_new_tokens', '?')} new tokens; sampled at "
            f"T = {s.get('sample_temperature', '?')}. teacher LL / byte: the teacher's log-likelihood of the answer in "
            "nats per UTF-8 byte (closer to the teacher's own answers = more teacher-like); ROUGE-L against the teacher's "
            "greedy answer; distinct-2 = unique word bigrams / bigrams; distinct char 4-grams and repeat share (longest "
            "substring seen twice / length) catch loops without spaces; empty = answers with no visible character.")
    return "<h3>Answer fidelity (means over the held-out prompts)</h3>" + table(head, rows) + f"<p class='note'>{note}</p>"


def _all_heldout(results: dict) -> str:
    """Distinct-2 of the students' greedy answers to all the held-out prompts (the demo's answer goal reads these)."""
    rows = [[esc(n), str(w["answers"]), num(w.get("distinct_2"), "{:.3f}"), num(w.get("distinct_2_stderr"), "{:.3f}"),
             num(w.get("distinct_2_min"), "{:.3f}"), str(w.get("empty_or_whitespace"))]
            for n, r in (results.get("runs") or {}).items() if (w := r.get("greedy_all_heldout"))]
    if not rows:
        return ""
    return ("<h3>Greedy answers to all the held-out prompts</h3>"
            + table(["student", "prompts", "distinct-2", "± standard error", "lowest", "empty"], rows)
            + "<p class='note'>The prompts above and more drawn the same way (student answers only; no teacher "
              "scoring): a mean over a dozen answers moves by up to ±0.24 between prompt sets.</p>")


def _goals(results: dict) -> str:
    goals = {k[len("goal: "):]: v for k, v in (results.get("goals") or {}).items() if k.startswith("goal: ")}
    if not goals:
        return ""
    items = "".join(f"<li><b>{'met' if v else 'not met'}</b>: {esc(k)}</li>" for k, v in goals.items())
    return f"<h3>Goals</h3><ul>{items}</ul>"


def render_tasks(results: dict | None) -> str:
    """HTML of the task section, or ``""`` when ``results`` carries no task scores."""
    results = results or {}
    body = _blimp(results) + _fidelity(results) + _all_heldout(results) + _goals(results)
    return f"<h2>Task scores</h2>{body}" if body else ""
