"""The benchmark scripts' own logic (benchmarks/common.py, throughput.py, quality.py, run_all.py).

Fast tests check the helpers and that both tools see the same data and optimise the same objective
(TRL's ``generalized_jsd_loss`` == distillery's fused chunked JSD, value and gradients, with masked
positions and the global-token normalisation). The ``slow`` test runs ``throughput.py`` end to end
at a minimal size. No test asserts a time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402
import quality  # noqa: E402
import run_all  # noqa: E402
import throughput  # noqa: E402


def test_alternation_and_steady_rate():
    assert common.alternate(["a", "b"], 2) == [(0, "a"), (0, "b"), (1, "a"), (1, "b")]
    # warm-up steps are dropped; the rate is total tokens / total time, not a mean of rates
    assert common.steady_tok_s([10.0, 1.0, 3.0], 100, skip=1) == pytest.approx(200 / 4)
    assert common.steady_tok_s([1.0], 100, skip=1) is None
    assert common.ratio(3.0, 0.0) is None and common.ratio(3.0, 2.0) == 1.5


def test_peak_rss_and_machine_info():
    assert common.peak_rss_bytes() > 10_000_000  # a Python process with torch loaded
    info = common.machine_info(command=["x"], threads=2)
    for key in ("cpu", "cores", "torch", "transformers", "date", "command"):
        assert info[key] is not None


@pytest.fixture(scope="module")
def bpe():
    return common.train_bpe_tokenizer(vocab_size=600, chars=100_000)


def test_chat_records_render_to_exactly_seq_len(bpe):
    recs = common.chat_records(bpe, 6, seq_len=96, prompt_tokens=24)
    assert len(recs) == 6
    for r in recs:
        text = bpe.apply_chat_template(r["messages"], tokenize=False)
        assert len(bpe(text, add_special_tokens=False)["input_ids"]) == 96
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]


def test_both_tools_see_identical_blocks_and_targets(bpe, tmp_path):
    pytest.importorskip("trl.experimental.utils", reason="TRL not installed (the test and bench extras)")
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in common.chat_records(bpe, 5, seq_len=64, prompt_tokens=16)))
    check = throughput.data_check(bpe, data, 64)
    assert check["identical_input_blocks"] and check["ours_padding_tokens"] == 0
    assert check["trl_shape"] == [5, 64] and check["ours_blocks"] == 5
    # same prompt/completion split, up to a token that straddles the boundary (TRL drops it, the tags keep it)
    assert abs(check["ours_targets_per_block"] - check["trl_targets_per_block"]) <= 1


def test_timed_objective_equals_trl_jsd():
    gkd = pytest.importorskip("trl.experimental.gkd", reason="TRL not installed (the test and bench extras)")
    from distillery.losses import chunked_distill_loss

    g = torch.Generator().manual_seed(3)
    B, T, H, V = 2, 9, 16, 50
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    head = torch.randn(V, H, generator=g, requires_grad=True)
    teacher = torch.randn(B, T, V, generator=g) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = -100  # prompt positions
    n = float((labels != -100).sum())
    ref = gkd.GKDTrainer.generalized_jsd_loss(hidden @ head.T, teacher, labels=labels, beta=0.5, num_items_in_batch=n)
    ref_grads = torch.autograd.grad(ref, (hidden, head))
    ours, _ = chunked_distill_loss(hidden, head, teacher, labels, kd="jsd", beta=0.5, loss_temperature=1.0,
                                   kd_weight=1.0, ce_weight=0.0, n_tokens=n, chunk_size=5)
    grads = torch.autograd.grad(ours, (hidden, head))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_matmul_params_excludes_untied_embeddings():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    untied = LlamaForCausalLM(LlamaConfig(**cfg, tie_word_embeddings=False))
    tied = LlamaForCausalLM(LlamaConfig(**cfg, tie_word_embeddings=True))
    total = sum(p.numel() for p in untied.parameters())
    assert common.matmul_params(untied) == total - 100 * 16
    assert common.matmul_params(tied) == total - 100 * 16  # the shared table counts once, as the head


def test_summary_ratios_and_goals():
    pair = {"models": {"student": {"matmul_parameters": 10}, "teacher": {"matmul_parameters": 100}}}
    runs = [{"system": "trl_fair", "round": 0, "steady_tok_s": 100.0, "peak_rss_bytes": 1000},
            {"system": "ours_live", "round": 0, "steady_tok_s": 300.0, "peak_rss_bytes": 300},
            {"system": "ours_cached", "round": 0, "error": "boom"},
            {"system": "student_ce", "round": 0, "steady_tok_s": 500.0, "peak_rss_bytes": 200},
            {"system": "trl_fair", "round": 1, "steady_tok_s": 120.0, "peak_rss_bytes": 1200}]
    s = throughput.summarise(pair, runs, peak_gflops=1.0)
    assert s["systems"]["trl_fair"]["tok_s"] == 110.0 and s["systems"]["trl_fair"]["peak_rss_bytes"] == 1200
    assert s["systems"]["ours_live"]["flops_per_token"] == 6 * 10 + 2 * 100
    assert s["systems"]["student_ce"]["flops_per_token"] == 60
    assert s["systems"]["ours_cached"]["errors"] == ["boom"] and s["systems"]["ours_cached"]["tok_s"] is None
    assert s["ratios"]["ours_live/trl_fair tok_s"] == pytest.approx(300 / 110)
    assert s["ratios"]["ours_live/trl_fair rss"] == pytest.approx(0.25)
    assert s["ratios"]["ours_live/trl_fair tok_s, best round of each"] == pytest.approx(300 / 120)
    assert s["ratios_per_round"]["ours_live/trl_fair tok_s"] == {0: pytest.approx(3.0)}  # paired within a round
    g = throughput.goals("real", s["ratios"])
    assert g["live >= 3.0x TRL fair tok/s"] is False and g["live <= 0.3x TRL fair RSS"] is True
    assert g["cached >= 0.8x student CE tok/s"] is None


def test_quality_recipes_are_valid_and_same_shape(tmp_path):
    from distillery.config import RunConfig

    args = type("A", (), {"quick": True, "steps": None, "lr": 1e-3, "work_dir": str(tmp_path)})()
    cfgs = {n: RunConfig.model_validate(quality.base_config(args, n)) for n in quality.RUNS}
    assert cfgs["ce_random"].loss.kd_weight == 0 and cfgs["ce_random"].loss.ce_weight == 1
    assert cfgs["kd_pruned"].student.init == "pruned" and cfgs["kd_random"].student.init == "config"
    assert cfgs["kd_pruned_onpolicy"].generation.on_policy_fraction == 0.5
    extra = {n: RunConfig.model_validate(quality.base_config(args, n)) for n in quality.EXTRA_RUNS}
    assert [c.loss.kd for c in extra.values()] == ["jsd"] * 3 and cfgs["kd_pruned"].loss.kd == "forward_kl"
    assert [c.generation.on_policy_fraction for c in extra.values()] == [0.0, 0.5, 0.5]
    assert [c.generation.on_policy_start for c in extra.values()] == [0, 0, cfgs["kd_pruned"].train.max_steps // 4]
    assert cfgs["kd_pruned_onpolicy"].generation.on_policy_start == 0
    assert all(c.student.init == "pruned" for c in extra.values())
    model = cfgs["kd_random"].student.model  # the random-init student has the pruned student's shape
    assert (model["num_hidden_layers"], model["hidden_size"], model["intermediate_size"], model["num_attention_heads"]) == \
        tuple(quality.PRUNE[k] for k in ("layers", "hidden", "ffn", "heads"))
    assert len({(c.train.max_steps, c.train.micro_batch_size, c.data.seq_len) for c in cfgs.values()}) == 1
    assert {c.train.seed for c in cfgs.values()} == {0}
    args.seed = 1  # --seed: every run's init and data order
    assert RunConfig.model_validate(quality.base_config(args, "kd_random")).train.seed == 1


def test_quality_verdicts():
    val = lambda kls: [{"tokens_seen": 100 * i, "kl_teacher_student": k} for i, k in enumerate(kls)]  # noqa: E731
    runs = {"ce_random": {"heldout": {"kl_teacher_student": 2.0}},
            "kd_random": {"heldout": {"kl_teacher_student": 1.2}, "curves": {"val": val([5, 3, 2, 1.5]), "tokens_seen": 300}},
            "kd_pruned": {"curves": {"val": val([2, 1.4, 1.0, 0.9]), "tokens_seen": 300}}}
    v = quality.verdicts(runs)
    assert v["kd_vs_ce_heldout_kl_reduction"] == pytest.approx(0.4)
    assert v["goal: KD beats CE on held-out KL by >= 30%"] is True
    assert v["kd_pruned_tokens_to_reach_it"] == 100 and v["kd_pruned_token_fraction"] == pytest.approx(1 / 3)
    assert quality.tokens_to_reach(val([3, 2]), 1.0) is None


def test_quality_lr_picks_each_methods_best_rate_by_validation(tmp_path):
    def point(ce_val, ce_held, kd_val, kd_held):
        def run(val, held):
            return {"curves": {"val": [{"kl_teacher_student": 9.0}, {"kl_teacher_student": val}], "tokens_seen": 100},
                    "heldout": {"kl_teacher_student": held, "top1_agreement": 0.3, "student_perplexity": 400.0},
                    "milton": {"kl_teacher_student": held + 0.1}}
        return {"runs": {"ce_random": run(ce_val, ce_held), "kd_random": run(kd_val, kd_held)}}

    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(point(3.0, 3.1, 2.0, 2.1)))  # lr 1e-3: CE's best by validation
    pb.write_text(json.dumps(point(3.2, 2.9, 1.8, 1.9)))  # lr 4e-3: KD's best (CE's held-out is lower, not chosen by it)
    out = tmp_path / "lr.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality_lr.py"), "--lrs", "1e-3,4e-3",
                    "--reuse", f"1e-3={pa}", "--reuse", f"4e-3={pb}", "--out", str(out)], check=True, cwd=ROOT, timeout=300)
    res = json.loads(out.read_text())
    assert res["best"]["ce_random"]["lr"] == "1e-3" and res["best"]["kd_random"]["lr"] == "4e-3"
    gain = res["verdict"]["kd_vs_ce_heldout_kl_reduction (each at its best lr)"]
    assert gain == pytest.approx(1 - 1.9 / 3.1)
    assert res["verdict"]["goal: KD beats CE on held-out KL by >= 30%"] is True


def test_run_all_commands(tmp_path, monkeypatch):
    monkeypatch.setattr(run_all, "HERE", tmp_path)
    (tmp_path / "with_quick.py").write_text("import argparse; p = argparse.ArgumentParser(); "
                                            "p.add_argument('--quick', action='store_true'); p.parse_args()")
    (tmp_path / "plain.py").write_text("import argparse; argparse.ArgumentParser().parse_args()")
    assert run_all.command("missing", True) == (None, "absent")
    assert run_all.command("with_quick", True)[0][-1] == "--quick"
    assert "--quick" not in run_all.command("plain", True)[0]
    assert "--quick" not in run_all.command("with_quick", False)[0]


@pytest.mark.slow
def test_throughput_end_to_end(tmp_path):
    pytest.importorskip("trl.experimental.gkd", reason="TRL not installed (the test and bench extras)")
    out = tmp_path / "tp.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--pair", "tiny", "--steps", "2", "--warmup", "1",
           "--rounds", "1", "--no-thp", "--systems", "trl_fair,ours_live,ours_cached,student_ce",
           "--work-dir", str(tmp_path / "work"), "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=3600)
    result = json.loads(out.read_text())
    tiny = result["pairs"]["tiny"]
    assert tiny["data_check"]["identical_input_blocks"]
    for name in ("trl_fair", "ours_live", "ours_cached", "student_ce"):
        assert tiny["systems"][name]["tok_s"] > 0 and tiny["systems"][name]["peak_rss_bytes"] > 0, name
    assert tiny["ratios"]["ours_live/trl_fair tok_s"] is not None
    assert result["machine"]["trl"] and result["matmul_peak_gflops"]["used"] > 0


def test_quality_eval_only_keeps_training_records(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"machine": {"command": "quality.py --runs ce_random", "threads": 1},
                             "runs": {"ce_random": {"seconds": 10.0, "recipe": "ce.yaml"}}}))
    b.write_text(json.dumps({"machine": {"command": "quality.py --runs kd_pruned", "threads": 2},
                             "runs": {"kd_pruned": {"seconds": 5.0}, "kd_random": {"error": "boom"}}}))
    info = quality.train_info_from([str(a), str(b)], ["ce_random", "kd_pruned", "kd_random"])
    assert set(info) == {"ce_random", "kd_pruned"}  # a run without a training time is not invented
    assert info["ce_random"]["seconds"] == 10.0 and info["ce_random"]["trained_by"]["threads"] == 1
    assert info["kd_pruned"]["trained_by"]["command"] == "quality.py --runs kd_pruned"
    assert quality.train_info_from([str(a)], ["kd_pruned"]) == {}
