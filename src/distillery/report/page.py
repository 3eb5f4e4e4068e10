"""Assemble the self-contained HTML page: inline CSS, images as data URIs, no script, no external links."""

from __future__ import annotations

import re
import time

import yaml

from . import plots
from .cells import esc, num, table
from .collect import SAMPLE_RUNTIME, sample_list
from .tasks import render_tasks

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;max-width:1180px;color:#222;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem} h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.3rem}
.sub{color:#666;margin-top:0} table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}
th,td{border:1px solid #ddd;padding:.35rem .6rem;text-align:right;vertical-align:top} th{background:#f5f5f5}
td:first-child,th:first-child,td:nth-child(2),th:nth-child(2){text-align:left} img{max-width:100%;display:block;margin:.5rem 0}
.pair td,.pair th{text-align:left;white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:.85rem}.pair{width:100%;table-layout:fixed}
.note{color:#666;font-size:.85rem} details pre{background:#f7f7f7;padding:.6rem;overflow:auto;font-size:.8rem}
"""


def human(n, unit: str = "") -> str:
    if n is None:
        return "–"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.1f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def comparison(data: dict) -> tuple[str, list[dict]]:
    """Teacher-vs-student table and the scatter points behind the quality-vs-size/speed picture."""
    runs, results = data["runs"], data["results"] or {}
    teacher = results.get("teacher") or {}
    runtimes = sorted({rt for r in runs for rt in r.get("runtime_tok_s", {})})
    has_second = any(r.get("second") for r in runs)
    head = ["model", "objective", "params", "size", "held-out ppl", "KL(T‖S)", "top-1 agree"]
    head += ["2nd corpus ppl", "2nd corpus KL"] if has_second else []
    head += ["train tok/s"] + [f"decode tok/s ({rt})" for rt in runtimes]
    rows, points = [], []
    t_held = next((r["heldout"] for r in runs if r.get("heldout") and r["heldout"].get("teacher_perplexity")), None)
    t_second = next((r["second"] for r in runs if r.get("second")), None)
    if teacher or t_held:
        t_params = teacher.get("parameters")
        t_speed = next((s["teacher_decode_tok_s"] for s in sample_list(results) if s.get("teacher_decode_tok_s")), None)
        row = [f"<b>teacher</b> {esc(teacher.get('name', ''))}", "–", human(t_params),
               human(t_params * 4, "B") + " (fp32)" if t_params else "–",
               num(t_held and t_held.get("teacher_perplexity"), "{:.2f}"), "0", "1.000"]
        row += [num(t_second and t_second.get("teacher_perplexity"), "{:.2f}"), "0"] if has_second else []
        row += ["–"] + [num(t_speed, "{:.0f}") if rt == SAMPLE_RUNTIME else "–" for rt in runtimes]
        rows.append(row)
        points.append({"name": "teacher", "kl": 0.0, "parameters": t_params, "teacher": True,
                       "speed": t_speed, "speed_label": f"decode tok/s ({SAMPLE_RUNTIME})"})
    for i, r in enumerate(runs):
        h, s = r.get("heldout") or {}, r.get("second") or {}
        row = [esc(r["name"]), esc(r["objective"]), human(r["parameters"]), human(r["size_bytes"], "B"),
               num(h.get("student_perplexity"), "{:.2f}"), num(h.get("kl_teacher_student")), num(h.get("top1_agreement"))]
        row += [num(s.get("student_perplexity"), "{:.2f}"), num(s.get("kl_teacher_student"))] if has_second else []
        row += [num(r["train_tok_s"], "{:.0f}")] + [num(r["runtime_tok_s"].get(rt), "{:.0f}") for rt in runtimes]
        rows.append(row)
        speeds = r.get("runtime_tok_s") or {}
        points.append({"name": r["name"], "kl": h.get("kl_teacher_student"), "parameters": r["parameters"], "color": i,
                       "speed": next(iter(speeds.values()), None),
                       "speed_label": f"decode tok/s ({next(iter(speeds), '')})"})
    return table(head, rows), points


def answer(text: str) -> str:
    """A model's continuation for a table cell: blank-line runs collapsed, whitespace-only made visible."""
    text = re.sub(r"\n\s*\n+", "\n\n", str(text or "")).strip()
    return esc(text) if text else "<i>(only whitespace)</i>"


def samples(results: dict | None) -> str:
    """Prompts answered side by side: one table per prompt, the teacher then every student that answered it."""
    items = sample_list(results)
    if not items:
        return "<p class='note'>No prompts were answered in this run (results.json has no sample).</p>"
    by_prompt: dict[str, list[dict]] = {}
    for s in items:
        by_prompt.setdefault(str(s.get("prompt", "")), []).append(s)
    out = []
    for prompt, group in by_prompt.items():
        # the demo's sample has no student_run: it answers with its KD student
        head = "<th>teacher</th>" + "".join(f"<th>student {esc(s.get('student_run', 'kd'))}</th>" for s in group)
        cells = f"<td>{answer(group[0].get('teacher'))}</td>" + "".join(f"<td>{answer(s.get('student'))}</td>" for s in group)
        decoding = group[0].get("decoding", "greedy, no repeated 3-grams")
        out.append(f"<p><b>prompt:</b> {esc(prompt)} <span class='note'>({esc(decoding)})</span></p>"
                   f"<table class='pair'><tr>{head}</tr><tr>{cells}</tr></table>")
    return "".join(out)


def render(data: dict) -> str:
    """The whole page as one HTML string."""
    runs, results = data["runs"], data["results"] or {}
    compare, points = comparison(data)
    curves = plots.curves(runs)
    scatter = plots.scatter(points)
    teacher = (results.get("teacher") or {}).get("name") or next(
        (r["config"].get("teacher", {}).get("source") for r in runs if r["config"]), "teacher")
    tokens = ", ".join(f"{esc(r['name'])}: {human((r['summary'] or {}).get('tokens_seen'))}" for r in runs)
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>distillery report: {esc(data['root'])}</title>",
             f"<style>{CSS}</style></head><body>",
             f"<h1>distillery report</h1><p class='sub'>{esc(data['root'])} · teacher <b>{esc(teacher)}</b> · "
             f"{len(runs)} run(s) · training tokens {tokens or '–'} · made {time.strftime('%Y-%m-%d %H:%M')}"
             + (" · <b>quick run</b>" if results.get("quick") else "") + "</p>",
             "<h2>Teacher and students</h2>", compare,
             "<p class='note'>held-out = the run's validation split; 2nd corpus = text never trained on (e.g. Milton); "
             "KL in nats per token at T = 1; agreement = argmax(teacher) == argmax(student).</p>",
             render_tasks(results),
             "<h2>Training and validation curves</h2>",
             f"<img alt='training and validation curves' src='{curves}'>" if curves else "<p class='note'>No metrics.jsonl records.</p>",
             "<h2>Quality vs size and speed</h2>",
             f"<img alt='quality vs size and speed' src='{scatter}'>" if scatter else
             "<p class='note'>No run has held-out KL and a parameter count yet.</p>",
             "<h2>Same prompt, teacher and student</h2>", samples(results)]
    for r in runs:
        if r["config"]:
            parts.append(f"<details><summary>config of {esc(r['name'])}</summary><pre>"
                         f"{esc(yaml.safe_dump(r['config'], sort_keys=False))}</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts)
