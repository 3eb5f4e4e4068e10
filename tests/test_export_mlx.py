"""MLX export (mlx-lm): logits and greedy tokens match PyTorch; quantized files are smaller and exact on their own weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("mlx_lm")

from distillery.errors import DistilleryError  # noqa: E402
from distillery.export import export_model  # noqa: E402
from tiny import sharp_student_folder, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return sharp_student_folder(tmp_path_factory.mktemp("student"))


@pytest.fixture(scope="module")
def exports(student):
    _, src = student
    out = {q: export_model(src, "mlx", src.parent / f"mlx-{q}", q, verify_tokens=256) for q in ("f32", "q8", "q4", "q2")}
    out["q3"] = export_model(src, "mlx", src.parent / "mlx-q3", "q3", verify_tokens=256, group_size=32)
    return out


def test_f32_matches_torch_and_greedy(exports):
    ver = exports["f32"]["verification"]
    assert ver["passed"] and ver["max_abs_diff"] <= 1e-4 and ver["kv_cache_max_abs_diff"] <= 1e-4
    assert ver["greedy_identical"] and ver["greedy_tokens"] == 32
    assert ver["fidelity"]["top1_agreement"] == 1.0 and ver["fidelity"]["kl_ref_test"] < 1e-8


@pytest.mark.parametrize("quant", ["q8", "q4", "q3", "q2"])
def test_quantized_exact_on_dequantized_weights(exports, quant):
    ver = exports[quant]["verification"]
    assert ver["passed"] and ver["max_abs_diff"] <= 1e-4 and ver["kv_cache_max_abs_diff"] <= 1e-4
    assert ver["greedy_identical"]
    kl = ver["fidelity"]["kl_ref_test"]              # rounding cost grows as bits shrink
    assert {"q8": kl < 1e-5, "q4": 1e-6 < kl < 1e-2, "q3": 1e-5 < kl < 0.1, "q2": 1e-4 < kl < 0.5}[quant]


def test_quantized_scales_and_biases_stored_fp16(exports):
    """Codes uint32, per-group scale and bias fp16 (not fp32: 16 more bits per group), norms fp32. So q3 at
    group 32 costs 3 + 2·16/32 = 4 bits per weight and q4 at group 64 costs 4 + 2·16/64 = 4.5 (both were 5)."""
    import mlx.core as mx

    for quant, (bits, group) in {"q8": (8, 64), "q4": (4, 64), "q3": (3, 32), "q2": (2, 64)}.items():
        path = Path(exports[quant]["path"])
        arrays = mx.load(str(path / "model.safetensors"))
        quantized = [k[:-len(".scales")] for k in arrays if k.endswith(".scales")]
        assert "model.embed_tokens" in quantized and len(quantized) == 1 + 7 * 2    # tied head: no lm_head
        for base in quantized:
            w, s, b = (arrays[f"{base}.{n}"] for n in ("weight", "scales", "biases"))
            assert w.dtype == mx.uint32 and s.dtype == mx.float16 and b.dtype == mx.float16
            assert 8 * (w.nbytes + s.nbytes + b.nbytes) / (s.size * group) == bits + 2 * 16 / group
        assert {str(a.dtype) for k, a in arrays.items() if k.endswith("norm.weight")} == {"mlx.core.float32"}
        assert json.loads((path / "distillery_mlx.json").read_text())["scales_dtype"] == "float16"
        index = json.loads((path / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == sum(a.nbytes for a in arrays.values())
    assert exports["q3"]["bytes"] < exports["q4"]["bytes"] * 0.92


def test_sizes_shrink_and_tied_embedding_stored_once(exports, student):
    model, _ = student
    sizes = {q: r["bytes"] for q, r in exports.items()}
    params = sum(p.numel() for p in model.parameters()) * 4          # tied: counted once
    assert params <= sizes["f32"] < params * 1.02
    assert sizes["f32"] > sizes["q8"] > sizes["q4"] > sizes["q2"]
    assert sizes["q4"] < sizes["f32"] * 0.25
    cfg = json.loads((Path(exports["q4"]["path"]) / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["group_size"] == 64


def test_mlx_lm_generates_what_torch_generates(exports, student):
    """mlx_lm's own stream_generate (greedy) from the exported folder yields the tokens torch's generate yields."""
    from mlx_lm import load, stream_generate

    model, src = student
    mlx_model, tok = load(exports["f32"]["path"])
    prompt = tiny_tokenizer()("To be, or not to be", add_special_tokens=False)["input_ids"]
    got = [r.token for r in stream_generate(mlx_model, tok, prompt=prompt, max_tokens=12)]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=3)
    assert len(got) == 12 and got == out[0, len(prompt):].tolist()


def test_refuses_output_inside_student_and_foreign_folder(student, tmp_path):
    _, src = student
    with pytest.raises(DistilleryError, match="inside the student folder"):
        export_model(src, "mlx", src / "mlx", "f32")
    with pytest.raises(DistilleryError, match="inside the student folder"):
        export_model(src, "mlx", src, "f32")
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(DistilleryError, match="not a previous mlx export"):
        export_model(src, "mlx", tmp_path, "f32")
    with pytest.raises(DistilleryError, match="--quant q4_0 is not available for mlx"):
        export_model(src, "mlx", tmp_path / "x", "q4_0")
    assert (tmp_path / "keep.txt").read_text() == "mine" and np.all([p.is_file() for p in src.iterdir()])


def test_bench_runtime_mlx(exports):
    from distillery.bench import bench_models

    result = bench_models([exports["q4"]["path"]], runtime="mlx", prompt_tokens=32, new_tokens=8, repeats=1,
                          threads=1, show=False)
    s = result["models"][0]["summary"]
    assert s["file_bytes"]["median"] == exports["q4"]["bytes"] and s["prefill_tok_s"]["median"] > 0
    assert s["decode_tok_s"]["median"] > 0 and s["peak_rss_bytes"]["median"] > 0
