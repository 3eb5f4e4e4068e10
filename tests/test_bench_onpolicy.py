"""benchmarks/onpolicy.py's own logic: steady-state rates and the step split, the headline ratio to the fastest TRL
configuration, and (slow) an end-to-end run at a minimal size. No test asserts a time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import onpolicy  # noqa: E402


def run(system, rnd, step_s, sampling, teacher, tokens=100, generated=60, rss=1000, loss=0.5):
    r = {"system": system, "round": rnd, "step_seconds": step_s, "sampling_seconds": sampling,
         "teacher_seconds": teacher, "tokens_per_step": [tokens] * len(step_s),
         "generated_per_step": [generated] * len(step_s), "peak_rss_bytes": rss, "losses": [loss]}
    r["steady"] = onpolicy.steady(r, warm=1)
    return r


def test_steady_skips_warmup_and_splits_the_step():
    r = run("ours_fp32", 0, [9.0, 2.0, 2.0], [5.0, 1.0, 0.5], [1.0, 0.5, 0.5])
    s = r["steady"]
    assert s["tok_s"] == pytest.approx(200 / 4) and s["generated_tok_s"] == pytest.approx(120 / 4)
    assert s["step_s"] == pytest.approx(2.0)
    assert s["split"] == pytest.approx({"sampling": 1.5 / 4, "teacher_forward": 1.0 / 4, "student_loss_optimizer": 1.5 / 4})
    assert onpolicy.steady({**r, "step_seconds": [1.0]}, warm=1) == {}


def test_headline_ratio_is_to_the_fastest_trl_configuration():
    runs = [run("ours_bf16", 0, [1, 1, 1], [0.5] * 3, [0.2] * 3, rss=300),
            run("trl_bf16", 0, [1, 4, 4], [2.0] * 3, [1.0] * 3, rss=1000, loss=0.52),   # 25 tok/s
            run("trl_fp32", 0, [1, 2, 2], [1.0] * 3, [0.5] * 3, rss=1200),               # 50 tok/s: the peer
            {"system": "trl_fp32", "round": 1, "error": "exit 1: boom"}]
    s = onpolicy.summarise(runs)
    assert s["ratios"]["peer"] == "trl_fp32" and s["ratios"]["ours"] == "ours_bf16"
    assert s["ratios"]["tok_s"] == pytest.approx(100 / 50) and s["ratios"]["peak_rss"] == pytest.approx(300 / 1200)
    assert s["systems"]["trl_bf16"]["first_step_loss"] == 0.52
    assert s["systems"]["trl_fp32"]["errors"] == ["exit 1: boom"] and s["systems"]["trl_fp32"]["tok_s"] == 50


def test_peak_rss_goal_is_judged_against_trls_lowest_peak_of_its_fastest_precision():
    """TRL under ours' allocator setting (+frees) counts for memory even where it is slower; the other precision
    and ours without the setting (-frees) do not change the ratio."""
    runs = [run("ours_bf16", 0, [1, 1, 1], [0.5] * 3, [0.2] * 3, rss=300),
            run("trl_fp32", 0, [1, 2, 2], [1.0] * 3, [0.5] * 3, rss=1200),            # fastest: the peer
            run("trl_fp32+frees", 0, [1, 3, 3], [1.0] * 3, [0.5] * 3, rss=1000),      # slower, lower peak
            run("trl_bf16", 0, [1, 4, 4], [2.0] * 3, [1.0] * 3, rss=900),             # another precision
            run("ours_bf16-frees", 0, [1, 1, 1], [0.5] * 3, [0.2] * 3, rss=400)]
    r = onpolicy.summarise(runs)["ratios"]
    assert r["peer"] == "trl_fp32" and r["peak_rss_peer"] == "trl_fp32+frees"
    assert r["peak_rss"] == pytest.approx(300 / 1000) and r["peak_rss_vs_fastest_trl"] == pytest.approx(300 / 1200)


@pytest.mark.slow
def test_onpolicy_end_to_end(tmp_path):
    pytest.importorskip("trl", minversion="1.16", reason="TRL not installed (the test and bench extras)")
    out = tmp_path / "onpolicy.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "onpolicy.py"), "--quick", "--pair", "tiny", "--steps", "2",
           "--warmup", "1", "--batch", "2", "--max-new-tokens", "8", "--work-dir", str(tmp_path / "work"), "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=3600)
    res = json.loads(out.read_text())
    tiny = res["pairs"]["tiny"]
    assert tiny["prompt_check"]["identical_prompts"]
    assert tiny["parity"]["abs_diff"] < 1e-5 * max(1.0, abs(tiny["parity"]["trl"]))  # same batch, both losses
    for name, s in tiny["systems"].items():
        assert s["tok_s"] > 0 and s["peak_rss_bytes"] > 0 and not s["errors"], name
        assert sum(s["split"].values()) == pytest.approx(1.0)
    assert tiny["ratios"]["tok_s"] is not None and isinstance(res["cpu_bf16_probe"]["fast"], bool)
