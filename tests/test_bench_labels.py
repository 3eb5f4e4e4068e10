"""bench: rows labelled so two students never read the same, progress on stderr, the table whole when piped."""

from __future__ import annotations

from distillery.bench.runner import labels, print_table
from distillery.quiet import console


def test_labels_tell_models_apart():
    assert labels(["runs/kd/student", "runs/ce/student"]) == ["kd/student", "ce/student"]
    assert labels(["a/x/student", "b/x/student", "m.gguf"]) == ["a/x/student", "b/x/student", "m.gguf"]
    assert labels(["one/student"]) == ["student"]


def _summary(v: float) -> dict:
    m = {"median": v, "min": v, "max": v}
    return {"file_bytes": m, "load_s": m, "prefill_tok_s": m, "decode_tok_s": m, "peak_rss_bytes": m}


def test_piped_table_is_not_cut_at_80_columns(capsys):
    assert console().width == 200  # pytest captures stdout: not a TTY
    result = {"runtime": "torch", "prompt_tokens": 512, "new_tokens": 128, "repeats": 3, "threads": 2,
              "models": [{"path": "runs/kd/student", "label": "kd/student", "summary": _summary(1e6)},
                         {"path": "runs/ce/student", "label": "ce/student", "summary": _summary(2e6)}]}
    print_table(result)
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if "student" in ln]
    assert [("kd/student" in r, "ce/student" in r) for r in rows] == [(True, False), (False, True)]
    assert "prefill tok/s" in out and "peak RSS MB" in out  # headers whole, not wrapped into "prefill…"
    assert max(len(ln) for ln in out.splitlines()) > 80
