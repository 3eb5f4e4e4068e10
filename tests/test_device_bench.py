"""Quality in the runtime (bench.quality): every runtime's perplexity and BLiMP equal torch's on the same weights;
MLX export keeps a transformers-5 student's rotary base (rope_parameters -> rope_theta)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from distillery.bench.quality import blimp_runtime, open_scorer, perplexity_torch, perplexity_windows
from distillery.errors import DistilleryError
from distillery.tasks.blimp import load_pairs, score_blimp
from tiny import sharp_student_folder, tiny_llama, tiny_tokenizer

PAIRS = load_pairs(per_paradigm=1, seed=0)[:12]   # 12 real BLiMP pairs (12 paradigms)


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return sharp_student_folder(tmp_path_factory.mktemp("dev") / "student")


@pytest.fixture(scope="module")
def ids():
    return tiny_tokenizer()(" ".join(["Of Man's first disobedience, and the fruit of that forbidden tree"] * 12),
                            add_special_tokens=False)["input_ids"][:200]


def test_torch_scorer_perplexity_equals_the_reference_formula(student, ids):
    model, src = student
    windows = [ids[i:i + 64] for i in range(0, len(ids), 64)]
    with torch.no_grad():   # exp(mean NLL) over all windows' next-token predictions, written out
        nll = [torch.nn.functional.cross_entropy(model(torch.tensor([w])).logits[0, :-1], torch.tensor(w[1:]),
                                                 reduction="sum").item() for w in windows]
    expected = math.exp(sum(nll) / sum(len(w) - 1 for w in windows))
    with open_scorer("torch", src) as logits:
        got = perplexity_windows(logits, windows)
    assert got["predictions"] == len(ids) - len(windows)
    assert got["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert perplexity_torch(model, ids, 64)["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_blimp_runtime_equals_the_batched_torch_scorer(student):
    """Same pairs, same prefix, one call per sentence vs tasks.blimp's padded batches: the same verdict per pair."""
    model, src = student
    tok = tiny_tokenizer()
    ref = score_blimp(model, tok, PAIRS, prefix="<|endoftext|>", progress=False)
    with open_scorer("torch", src) as logits:
        got = blimp_runtime(logits, tok, PAIRS, prefix="<|endoftext|>")
    assert got["per_paradigm"] == ref["per_paradigm"] and got["overall"] == ref["overall"]
    assert got["n_pairs"] == 12 and got["prefix_token"] == "<|endoftext|>"


def test_mlx_scorer_matches_torch_on_a_theta_1e5_student(tmp_path, ids):
    """A student saved by transformers 5 stores its rotary base only in rope_parameters; mlx-lm reads rope_theta.
    The export must carry it, or MLX computes other logits (it did: max |dlogit| 2.2 on the demo student)."""
    pytest.importorskip("mlx_lm")
    from distillery.export import export_model

    model = tiny_llama(tie=True)
    model.config.rope_parameters = {"rope_type": "default", "rope_theta": 100000.0}
    model = type(model)(model.config).eval()
    with torch.no_grad():   # sharp attention, so the rotary frequencies matter
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(5)
            layer.self_attn.k_proj.weight.mul_(5)
    src = tmp_path / "student"
    model.save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    assert "rope_theta" not in json.loads((src / "config.json").read_text())
    rep = export_model(src, "mlx", tmp_path / "mlx", "f32", verify_tokens=128)
    assert json.loads((tmp_path / "mlx" / "config.json").read_text())["rope_theta"] == 100000.0
    assert rep["verification"]["passed"] and rep["verification"]["max_abs_diff"] < 1e-4
    windows = [ids[i:i + 64] for i in range(0, len(ids), 64)]
    with open_scorer("mlx", tmp_path / "mlx") as logits:
        mlx_ppl = perplexity_windows(logits, windows)["perplexity"]
    assert mlx_ppl == pytest.approx(perplexity_torch(model, ids, 64)["perplexity"], rel=1e-4)


def test_mlx_q3_scorer_equals_torch_on_the_dequantized_weights(student, tmp_path, ids):
    """A 3-bit MLX file scored in MLX gives the perplexity torch gives on its dequantized weights (the runtime
    runs what the torch-side number claims), and BLiMP verdicts agree pair by pair."""
    pytest.importorskip("mlx_lm")
    from distillery.export import export_model
    from distillery.export.mlx_export import dequantized_torch

    model, src = student
    export_model(src, "mlx", tmp_path / "q3", "q3", group_size=32, verify=False)
    ref = dequantized_torch(tmp_path / "q3", model)
    tok = tiny_tokenizer()
    with open_scorer("mlx", tmp_path / "q3") as logits:
        got = perplexity_windows(logits, [ids[i:i + 64] for i in range(0, len(ids), 64)])["perplexity"]
        blimp = blimp_runtime(logits, tok, PAIRS, prefix="<|endoftext|>")
    assert got == pytest.approx(perplexity_torch(ref, ids, 64)["perplexity"], rel=1e-4)
    assert got != pytest.approx(perplexity_torch(model, ids, 64)["perplexity"], rel=1e-3)  # 3 bits do cost
    assert blimp["per_paradigm"] == score_blimp(ref, tok, PAIRS, prefix="<|endoftext|>", progress=False)["per_paradigm"]


def test_onnx_and_llamacpp_scorers_match_torch(student, tmp_path, ids):
    model, src = student
    from distillery.export import export_model

    windows = [ids[i:i + 64] for i in range(0, len(ids), 64)]
    expected = perplexity_torch(model, ids, 64)["perplexity"]
    rep = export_model(src, "onnx", tmp_path / "onnx", "f32", verify=False)
    with open_scorer("onnx", Path(rep["path"]).parent) as logits:
        assert perplexity_windows(logits, windows)["perplexity"] == pytest.approx(expected, rel=1e-5)
    pytest.importorskip("llama_cpp")
    rep = export_model(src, "gguf", tmp_path / "s.gguf", "f32", verify=False)
    with open_scorer("llamacpp", rep["path"], max_tokens=64) as logits:
        assert perplexity_windows(logits, windows)["perplexity"] == pytest.approx(expected, rel=1e-3)


def test_scorer_refuses_unknown_runtime_and_empty_windows(student):
    _, src = student
    with pytest.raises(DistilleryError, match="no scorer"), open_scorer("tflite", src):
        pass
    with pytest.raises(DistilleryError, match="no window"):
        perplexity_windows(lambda w: np.zeros((len(w), 4), np.float32), [[1]])
