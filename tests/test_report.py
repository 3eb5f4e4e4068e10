"""``distillery report``: a self-contained HTML page from run JSON, checked in a real headless browser.

The fixture is a folder of two runs (KD and CE) as ``distill`` and ``demo`` write them: metrics.jsonl
(training and validation records), summary.json, config.yaml, a student safetensors file, and the
demo's results.json with a prompt answered by teacher and student. The browser test renders the page
in headless Chromium (Debian's ``chromium``; ``.ci/run`` installs it) and reads back, from the DOM,
every image's natural size after load; it is skipped when no Chromium is installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from distillery.cli import main
from distillery.errors import DistilleryError
from distillery.report import write_report
from distillery.report.collect import collect, safetensors_stats


def _save_student(folder: Path, hidden: int, vocab: int = 64) -> int:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    tensors = {"model.embed_tokens.weight": np.zeros((vocab, hidden), np.float32),
               "model.norm.weight": np.ones(hidden, np.float32)}
    save_file(tensors, str(folder / "model.safetensors"))
    return vocab * hidden + hidden


def _run(folder: Path, kd_weight: float, ce_weight: float, hidden: int, kl0: float) -> int:
    folder.mkdir(parents=True)
    lines = []
    for step in range(1, 21):
        loss = kl0 * (0.9 ** step) + 0.1
        lines.append({"step": step, "loss": loss, "kd": loss, "ce": 3.0, "lr": 1e-3, "grad_norm": 1.0,
                      "tokens_seen": step * 1024, "tok_s": 500.0 + step})
        if step % 5 == 0:
            lines.append({"step": step, "split": "val", "teacher_perplexity": 9.0, "student_perplexity": 20.0 - step / 2,
                          "kl_teacher_student": loss, "top1_agreement": 0.2 + step / 100, "tokens": 512})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 21, "los')  # torn tail
    (folder / "summary.json").write_text(json.dumps({"steps": 20, "tokens_seen": 20480, "validation": lines[-1]}))
    cfg = {"teacher": {"source": "smollm2"}, "loss": {"kd": "forward_kl", "kd_weight": kd_weight, "ce_weight": ce_weight},
           "student": {"init": "config"}, "train": {"max_steps": 20}}
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    return _save_student(folder / "student", hidden)


@pytest.fixture
def demo_dir(tmp_path: Path) -> Path:
    root = tmp_path / "demo"
    _run(root / "kd", 1.0, 0.0, hidden=16, kl0=2.0)
    _run(root / "ce", 0.0, 1.0, hidden=8, kl0=4.0)
    held = {"teacher_perplexity": 9.5, "student_perplexity": 14.0, "kl_teacher_student": 0.8, "top1_agreement": 0.4}
    results = {"teacher": {"name": "SmolLM2-135M-Instruct", "parameters": 134_515_008},
               "runs": {"kd": {"heldout": held, "milton": dict(held, kl_teacher_student=1.1), "train_tok_s": 512.0},
                        "ce": {"heldout": dict(held, kl_teacher_student=1.5), "milton": held, "train_tok_s": 700.0}},
               "sample": {"prompt": "To be, or not to be", "teacher": "that is the question <&>",
                          "student": "that is the quest", "teacher_decode_tok_s": 40.0, "student_decode_tok_s": 300.0},
               "quick": True}
    (root / "results.json").write_text(json.dumps(results))
    return root


def test_collect_reads_runs_results_and_sizes(demo_dir: Path):
    data = collect(demo_dir)
    runs = {r["name"]: r for r in data["runs"]}
    assert set(runs) == {"kd", "ce"}
    kd = runs["kd"]
    assert len(kd["train"]) == 20 and len(kd["val"]) == 4  # the torn last line is skipped
    assert kd["val"][0]["tokens_seen"] == 5 * 1024
    assert kd["parameters"] == 64 * 16 + 16
    assert kd["heldout"]["kl_teacher_student"] == 0.8 and kd["second"]["kl_teacher_student"] == 1.1
    assert kd["objective"] == "KD forward_kl" and runs["ce"]["objective"] == "CE"
    assert kd["runtime_tok_s"] == {"torch, greedy sample": 300.0} and runs["ce"]["runtime_tok_s"] == {}
    assert safetensors_stats(demo_dir / "kd" / "student")[0] == 64 * 16 + 16


def test_report_is_self_contained(demo_dir: Path, tmp_path: Path):
    out = write_report(demo_dir, tmp_path / "r" / "report.html")
    page = out.read_text()
    imgs = re.findall(r"<img [^>]*src='([^']*)'", page)
    assert len(imgs) == 2 and all(src.startswith("data:image/png;base64,") for src in imgs)
    assert not re.search(r"(src|href)=['\"]?https?:", page)  # nothing fetched from elsewhere
    assert "that is the question &lt;&amp;&gt;" in page  # model text is escaped
    for text in ("SmolLM2-135M-Instruct", "134.5M", "0.800", "2nd corpus KL", "quick run"):
        assert text in page


def test_cli_verb_and_default_path(demo_dir: Path, capsys):
    assert main(["report", str(demo_dir / "kd")]) == 0  # a single run finds the demo's results.json above it
    path = Path(capsys.readouterr().out.strip())
    assert path == demo_dir / "kd" / "report.html" and path.stat().st_size > 10_000


def test_report_of_real_distill_runs(tmp_path: Path):
    """What the loop really writes (not a fixture): two tiny runs in one folder, then the report."""
    from helpers_run import write_recipe

    runs = tmp_path / "runs"
    for name, loss in (("kd", {"kd_weight": 1.0, "ce_weight": 0.0}), ("ce", {"kd_weight": 0.0, "ce_weight": 1.0})):
        assert main(["distill", str(write_recipe(tmp_path, runs / name, loss=loss))]) == 0
    data = collect(runs)
    by = {r["name"]: r for r in data["runs"]}
    assert set(by) == {"kd", "ce"} and by["ce"]["objective"] == "CE"
    assert len(by["kd"]["train"]) == 6 and [v["step"] for v in by["kd"]["val"]] == [3, 6]
    assert by["kd"]["heldout"]["kl_teacher_student"] > 0 and by["kd"]["parameters"] > 0
    page = write_report(runs).read_text()
    assert page.count("data:image/png;base64,") == 2 and "No prompts were answered" in page


def test_empty_folder_is_a_clear_error(tmp_path: Path):
    with pytest.raises(DistilleryError, match="holds no run"):
        write_report(tmp_path)
    assert main(["report", str(tmp_path / "missing")]) == 2


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


PROBE = """<script>
window.addEventListener('load', () => {
  const sizes = Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight]);
  document.body.setAttribute('data-images', JSON.stringify(sizes));
});
</script></body>"""


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (.ci/run installs Debian's chromium)")
def test_report_renders_in_headless_chromium(demo_dir: Path, tmp_path: Path):
    page = write_report(demo_dir, tmp_path / "report.html").read_text()
    probe = tmp_path / "probe.html"  # the report plus a script that records each image's decoded size
    probe.write_text(page.replace("</body>", PROBE))
    flags = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    dom = subprocess.run(flags + ["--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=180).stdout
    m = re.search(r"data-images=\"([^\"]*)\"", dom)
    assert m, f"page did not finish loading: {dom[:300]!r}"
    sizes = json.loads(m.group(1).replace("&quot;", '"'))
    assert len(sizes) == 2
    assert all(done and w > 300 and h > 150 for done, w, h in sizes), sizes

    shot = tmp_path / "shot.png"
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1280,1600", (tmp_path / "report.html").as_uri()],
                   capture_output=True, timeout=180)
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))[..., :3]
    assert pixels.shape[:2] == (1600, 1280)
    assert pixels.std() > 0.05 and (pixels.mean(axis=2) < 0.5).mean() > 0.005  # not blank: dark text and lines
