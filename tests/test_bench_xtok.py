"""benchmarks/cross_tokenizer.py: the held-out split, bits per byte, the gap/goal arithmetic (fast), and the whole
script at --quick on a tiny teacher and a 600-entry BPE student, TRL GOLD included (slow: seven processes)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import cross_tokenizer  # noqa: E402
import xtok_eval  # noqa: E402
import xtok_report  # noqa: E402


def test_split_keeps_heldout_text_out_of_training():
    text = "".join(f"line {i} of the play\n" for i in range(20_000))
    train, held = cross_tokenizer.split_text(text, heldout_chars=6000)
    assert sum(map(len, held)) == 6000
    assert not any(h in t for h in held for t in train)  # no held-out piece is inside a training piece
    assert len(held) == 2 and all(t.endswith("\n") for t in train)


def test_bits_per_byte_of_a_uniform_model_is_log2_vocab_over_bytes_per_token(tmp_path):
    from tiny import tiny_tokenizer

    tok = tiny_tokenizer(512)

    class Uniform(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 512)})()

    f = cross_tokenizer.write_jsonl(tmp_path / "h.jsonl", ["To be, or not to be, that is the question.\n" * 40])
    got = xtok_eval.bits_per_byte(Uniform(), tok, str(f), seq_len=32)
    assert got["tokens"] > 0
    assert got["bits_per_byte"] == pytest.approx(got["tokens"] * math.log2(512) / got["bytes"], rel=1e-6)  # fp32 log-softmax


def _result(teacher=1.0, ce=3.0, arms=None):
    runs = {}
    for arm, (bpb, tok_s, rss) in (arms or {}).items():
        runs[f"gpt2/{arm}"] = {"tok_s": tok_s, "peak_rss_bytes": rss,
                               "eval": {"heldout": {"bits_per_byte": bpb}, "milton": {"bits_per_byte": bpb + 1},
                                        "blimp": {"overall": 0.6}}}
    runs["gpt2/ce"] = {"tok_s": 100, "peak_rss_bytes": 1e9, "eval": {"heldout": {"bits_per_byte": ce},
                       "milton": {"bits_per_byte": ce + 1}, "blimp": {"overall": 0.5}}}
    return {"teacher": {"heldout": {"bits_per_byte": teacher}, "milton": {"bits_per_byte": teacher + 1},
                        "blimp": {"overall": 0.7}}, "runs": runs}


def test_gap_closed_goals_and_recommended_default():
    r = _result(arms={"exact_kl": (2.5, 60, 2e9), "uld": (2.9, 50, 2e9), "gold": (2.8, 40, 2e9),
                      "seqkd": (2.7, 90, 1e9), "gold_trl": (2.6, 20, 5e9)})
    s = xtok_report.summary(r)
    assert s["gpt2"]["arms"]["exact_kl"]["heldout_gap_closed"] == pytest.approx(0.25)
    assert s["gpt2"]["arms"]["uld"]["milton_gap_closed"] == pytest.approx(0.05)
    r["summary"] = s
    v = xtok_report.verdicts(r)
    assert v["recommended_xtok_method"] == "exact_kl"
    assert v["gpt2: exact_kl closes >= 20% of CE's held-out gap"] is True
    assert v["gpt2: uld closes >= 20% of CE's held-out gap"] is False
    assert v["gpt2: exact_kl beats sequence-level KD (held-out bpb)"] is True
    assert v["gpt2: gold beats sequence-level KD (held-out bpb)"] is False
    peer = v["gpt2: exact_kl vs GOLD (TRL)"]
    assert peer["tok_s_ratio"] == pytest.approx(3.0) and peer["rss_ratio"] == pytest.approx(0.4)
    assert peer["quality >= GOLD"] and peer[">= 2x tok/s"] and peer["<= 0.5x memory"]
    assert not v["gpt2: gold vs GOLD (TRL)"]["quality >= GOLD"]
    # alternated speed rounds, when measured, decide the tok/s goal (the one-after-the-other ratio stays reported)
    r["speed_rounds"] = {"tokenizer": "gpt2", "arm": "exact_kl", "median_ratio": 1.8}
    peer = xtok_report.verdicts(r)["gpt2: exact_kl vs GOLD (TRL)"]
    assert peer["tok_s_ratio"] == pytest.approx(3.0) and peer["tok_s_ratio_alternated_median"] == 1.8
    assert not peer[">= 2x tok/s"]
    assert xtok_report.verdicts(r)["gpt2: uld vs GOLD (TRL)"]["tok_s_ratio_alternated_median"] is None
    # another method wins by more than the tie margin: it is recommended
    r2 = _result(arms={"exact_kl": (2.5, 60, 2e9), "uld": (2.4, 50, 2e9), "gold": (2.8, 40, 2e9)})
    assert xtok_report.recommended(xtok_report.summary(r2)) == "uld"


@pytest.mark.slow
def test_cross_tokenizer_quick_end_to_end(tmp_path):
    pytest.importorskip("trl.experimental.gold", reason="TRL not installed (the test and bench extras)")
    from helpers_run import make_teacher

    out = tmp_path / "x.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "cross_tokenizer.py"), "--quick", "--teacher",
           str(make_teacher(tmp_path)), "--student", "tiny", "--tokenizers", "bpe:600", "--gold-tokenizers", "bpe600",
           "--corpus-chars", "300000", "--threads", "1", "--work-dir", str(tmp_path / "work"), "--out", str(out),
           "--speed-rounds", "1", "--speed-round-steps", "3"]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=1800, capture_output=True)
    r = json.loads(out.read_text())
    assert r["machine"]["cpu"] and r["precision"] in ("bf16", "no")
    arms = r["summary"]["bpe600"]["arms"]
    assert set(arms) == {"ce", "seqkd", "exact_kl", "uld", "gold", "gold_trl"}
    for name, a in arms.items():
        assert a["error"] is None, name
        assert a["tok_s"] > 0 and a["peak_rss_gb"] > 0, name
        assert 0 < a["heldout_bpb"] < 20 and 0 < a["milton_bpb"] < 20 and 0 <= a["blimp"] <= 1, name
    for m in ("exact_kl", "uld", "gold"):
        assert arms[m]["aligned_kl"] >= 0 and r["runs"][f"bpe600/{m}"]["recipe"]["loss"]["xtok_method"] == m
    assert r["runs"]["bpe600/gold_trl"]["trl_settings"]["uld_use_hybrid_loss"] is True
    assert r["seqkd"]["documents"] == 6 and Path(r["seqkd"]["file"]).is_file()
    assert r["verdicts"]["recommended_xtok_method"] in ("exact_kl", "uld", "gold")
    rounds = r["speed_rounds"]
    assert rounds["arm"] == "exact_kl" and len(rounds["ratios"]) == 1 and rounds["median_ratio"] > 0
    assert r["verdicts"]["bpe600: exact_kl vs GOLD (TRL)"]["tok_s_ratio_alternated_median"] == rounds["median_ratio"]


def test_arms_per_tokenizer():
    from types import SimpleNamespace

    args = SimpleNamespace(arms=",".join(cross_tokenizer.ARMS), gold_tokenizers="gpt2",
                           tokenizer_arms="bpe:8192=seqkd,ce,exact_kl")
    assert cross_tokenizer.arms_for(args, "gpt2") == cross_tokenizer.ARMS
    assert cross_tokenizer.arms_for(args, "bpe8192") == ["exact_kl", "ce", "seqkd"]  # ARMS order, no gold_trl
    args.tokenizer_arms = None
    assert "gold_trl" not in cross_tokenizer.arms_for(args, "bpe8192")
