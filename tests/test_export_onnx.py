"""ONNX export with KV cache: ONNX Runtime logits match PyTorch (fp32) for full and cached passes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distillery.export import export_model
from distillery.export.onnx_runtime import onnx_forward, onnx_session
from tiny import tiny_llama, tiny_qwen2, tiny_tokenizer


def _export(tmp_path_factory, model):
    with torch.no_grad():                          # non-uniform attention, so positions and cache matter
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(5)
            layer.self_attn.k_proj.weight.mul_(5)
    src = tmp_path_factory.mktemp("student")
    model.save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    out = src.parent / (src.name + "-onnx")
    report = export_model(src, "onnx", out, "f32", verify=True)
    return model, out, report


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return _export(tmp_path_factory, tiny_llama())


def test_export_report_and_folder(exported):
    _, out, report = exported
    ver = report["verification"]
    assert ver["passed"] and ver["max_abs_diff"] <= 1e-4 and ver["kv_cache_max_abs_diff"] <= 1e-4
    assert ver["top1_agreement"] == 1.0 and report["kv_cache"] is True
    for name in ("model.onnx", "tokenizer.json", "config.json", "distillery_onnx.json"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "distillery_onnx.json").read_text())
    assert manifest["inputs"][:3] == ["input_ids", "attention_mask", "past_key_values.0.key"]
    assert manifest["outputs"][-1] == "present.1.value"


def test_batch_and_incremental_decoding_match_torch(exported):
    """Batch 2, prefill 7 tokens, then 3 single-token steps with the returned cache: max |Δ| <= 1e-4."""
    model, out, _ = exported
    session = onnx_session(str(out / "model.onnx"), threads=1)
    torch.manual_seed(0)
    ids = torch.randint(0, 512, (2, 10))
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    logits, past = onnx_forward(session, ids[:, :7].numpy())
    steps = [logits]
    for t in range(7, 10):
        logits, past = onnx_forward(session, ids[:, t:t + 1].numpy(), past, past_len=t)
        steps.append(logits)
    got = np.concatenate(steps, axis=1)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4
    assert past["past_key_values.0.key"].shape == (2, 2, 10, 16)


@pytest.mark.slow
def test_qwen2_onnx_matches_torch(tmp_path_factory):
    _, _, report = _export(tmp_path_factory, tiny_qwen2())
    assert report["verification"]["passed"] and report["verification"]["max_abs_diff"] <= 1e-4
