"""Slow tier: llama.cpp (llama-cpp-python) runs our GGUF exports; logits and tokenizer match PyTorch/HF."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distillery.errors import DistilleryError
from distillery.export import export_model
from distillery.export import gguf_export, gguf_families
from tiny import tiny_llama, tiny_qwen2, tiny_tokenizer

pytestmark = pytest.mark.llamacpp
llama_cpp = pytest.importorskip("llama_cpp")



def sharpen(model, scale: float = 5.0):
    """Scale q/k projections so attention is far from uniform. At random init (std 0.02) q·k is ~0,
    attention averages evenly and a wrong RoPE layout still agrees 99 % on top-1; at 5x it drops to ~70 %."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(scale)
            layer.self_attn.k_proj.weight.mul_(scale)
    return model


MODELS = {"llama": lambda: sharpen(tiny_llama()), "qwen2": lambda: sharpen(tiny_qwen2()),
          "llama_tied": lambda: sharpen(tiny_llama(tie=True))}


@pytest.fixture(scope="module", params=sorted(MODELS))
def student(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model = MODELS[request.param]()
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path, model


@pytest.mark.parametrize("quant,max_abs", [("f32", 1e-3), ("f16", 3e-3)])
def test_float_exports_match_pytorch(student, tmp_path, quant, max_abs):
    path, _ = student
    ver = export_model(path, "gguf", tmp_path / f"s-{quant}.gguf", quant)["verification"]
    assert ver["passed"] and ver["top1_agreement"] >= 0.99 and ver["max_abs_diff"] <= max_abs
    assert ver["tokenizer_samples"] == 100 and ver["tokenizer_agreement"] == 1.0


def test_q8_0_export_agrees(student, tmp_path):
    ver = export_model(student[0], "gguf", tmp_path / "s-q8.gguf", "q8_0")["verification"]
    assert ver["passed"] and ver["top1_agreement"] >= 0.97 and ver["top1_agreement_decided"] >= 0.99
    assert ver["tie_std"] == 0.05 and ver["decided_positions"] >= 0.7 * ver["positions"]   # the check is not vacuous


def test_q4_0_export_is_reported(student, tmp_path):
    ver = export_model(student[0], "gguf", tmp_path / "s-q4.gguf", "q4_0")["verification"]
    assert ver["passed"] and ver["threshold_top1"] is None and 0.5 <= ver["top1_agreement"] <= 1.0


def test_greedy_generation_is_identical(student, tmp_path):
    path, model = student
    gguf_path = export_model(path, "gguf", tmp_path / "g.gguf", "f32", verify=False)["path"]
    prompt = tiny_tokenizer()("Of Man's first disobedience", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, min_new_tokens=24,
                            eos_token_id=None, pad_token_id=3)[0, len(prompt):].tolist()
    llm = llama_cpp.Llama(model_path=gguf_path, n_ctx=64, logits_all=False, verbose=False, n_threads=1)
    llm.eval(prompt)
    ours = []
    for _ in range(24):
        nxt = int(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),)).argmax())
        ours.append(nxt)
        llm.eval([nxt])
    llm.close()
    assert ours == hf


@pytest.mark.parametrize("quant", ["f32", "q8_0"])
def test_missing_qk_permutation_fails_verification(tmp_path, monkeypatch, quant):
    """Without the q/k permutation llama.cpp's RoPE scrambles attention: export must fail and move the file,
    at q8_0 too (its check counts only positions where torch's top-1 is decided, and must still refuse)."""
    path = tmp_path / "student"
    sharpen(tiny_llama()).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    monkeypatch.setattr(gguf_families, "permute_qk", lambda w, n_head: w)   # fix_tensor looks it up there
    with pytest.raises(DistilleryError, match="failed verification.*top-1 agreement"):
        export_model(path, "gguf", tmp_path / "bad.gguf", quant)
    assert not (tmp_path / "bad.gguf").exists() and (tmp_path / "bad.gguf.rejected").is_file()


def test_q8_0_with_corrupted_weights_fails_verification(tmp_path, monkeypatch):
    """A q8_0 file whose attention output projections were written with their blocks' scales x3 (a broken
    writer, not rounding) is refused by the decided-top-1 check."""
    path = tmp_path / "student"
    sharpen(tiny_llama()).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    real = gguf_export.gguf_tensors

    def corrupted(model, arch=None):
        for name, data in real(model, arch):
            yield name, data * 3 if name.endswith("attn_output.weight") else data
    monkeypatch.setattr(gguf_export, "gguf_tensors", corrupted)
    with pytest.raises(DistilleryError, match="failed verification.*top-1 agreement where torch's top-1 leads by > 0.05 std"):
        export_model(path, "gguf", tmp_path / "bad.gguf", "q8_0")
