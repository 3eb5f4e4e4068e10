"""``embedding_bits``: the tied embedding / LM head on a wider affine grid than the layers (2-bit layers, 4-bit
embedding), through QAT, ``quantize_model`` and the MLX export; bad values are one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distillery.config import load_config
from distillery.errors import DistilleryError
from distillery.quantize import fake_quantize, load_quantized, qat_unwrap, qat_wrap, quantize_model
from distillery.quantize.core import affine_dequantize, affine_quantize
from distillery.quantize.qat import embedding_names
from helpers_run import write_recipe
from tiny import sharp_student_folder, tiny_llama

G = 32


def _max_distinct_per_group(w: torch.Tensor) -> int:
    """The most distinct values any group of ``G`` consecutive input weights holds; ``w`` is ``(O, I)``."""
    groups = w.detach().reshape(-1, G)
    return max(len(torch.unique(g)) for g in groups)


@pytest.mark.parametrize("tie", [True, False])
def test_qat_wraps_embedding_and_head_at_embedding_bits(tie):
    """bits=2, embedding_bits=4: the embedding and LM head get a 4-bit fake quantizer, every other linear a 2-bit
    one; the forward weights lie on those grids (≤ 16 / ≤ 4 values per group of 32, and the 4-bit grid is used:
    more than 4 values in some group); unwrapping leaves the latent fp32 weights."""
    model = tiny_llama(tie=tie)
    latent = {k: v.clone() for k, v in model.state_dict().items()}
    names = qat_wrap(model, bits=2, group_size=G, embedding_bits=4)
    high = embedding_names(model)
    assert high == {"model.embed_tokens", "lm_head"}
    assert len(names) == 2 + 7 * 2
    for name in names:
        module = model.get_submodule(name)
        fq = module.parametrizations.weight[0]
        assert (fq.bits, fq.group_size, fq.scheme) == ((4 if name in high else 2), G, "affine")
        distinct = _max_distinct_per_group(module.weight)
        assert distinct <= 2 ** fq.bits
        if name in high:
            assert distinct > 4
        assert torch.equal(module.weight, fake_quantize(module.parametrizations.weight.original, fq.bits, G,
                                                        scheme="affine"))
    loss = model(torch.tensor([[1, 2, 3, 4]])).logits.pow(2).mean()
    loss.backward()                                   # straight-through: the latent embedding gets a gradient
    assert model.model.embed_tokens.parametrizations.weight.original.grad.abs().sum() > 0
    qat_unwrap(model)
    assert all(torch.equal(v, latent[k]) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return sharp_student_folder(tmp_path_factory.mktemp("student"))


@pytest.fixture(scope="module")
def quantized(student):
    _, src = student
    return quantize_model(src, bits=2, group_size=G, embedding_bits=4, out_dir=src.parent / "q2e4", eval_tokens=0)


def test_quantize_model_puts_embedding_on_its_grid(student, quantized):
    """quantize_model(bits=2, embedding_bits=4): the saved embedding is the 4-bit grid of the fp32 one, every
    linear the 2-bit grid; quantization.json records embedding_bits; load_quantized rebuilds the same weights
    from the packed file, whose embedding codes take 4 bits (64 columns → 8 uint32 words per row)."""
    model, src = student
    out = quantized["out_dir"]
    assert quantized["embedding_bits"] == 4 and quantized["bits"] == 2
    assert json.loads((src.parent / "q2e4" / "quantization.json").read_text())["embedding_bits"] == 4
    loaded = load_quantized(out)
    emb = loaded.model.embed_tokens.weight
    assert torch.equal(emb, fake_quantize(model.model.embed_tokens.weight, 4, G, scheme="affine"))
    assert 4 < _max_distinct_per_group(emb) <= 16
    for name, lin in loaded.named_modules():
        if isinstance(lin, torch.nn.Linear) and name != "lm_head":
            ref = model.get_submodule(name).weight
            assert torch.equal(lin.weight, fake_quantize(ref, 2, G, scheme="affine"))
            assert _max_distinct_per_group(lin.weight) <= 4
    from safetensors.torch import load_file
    packed = load_file(str(src.parent / "q2e4" / "quantized.safetensors"))
    assert packed["model.embed_tokens.qweight"].shape == (512, 64 * 4 // 32)
    assert packed["model.layers.0.mlp.up_proj.qweight"].shape == (128, 64 * 2 // 32)


def test_qat_then_quantize_is_what_training_saw():
    """The grid a QAT run trains on (embedding_bits=4) is the one quantize_linears writes: equal weights."""
    from distillery.quantize import quantize_linears

    model = tiny_llama(tie=True, seed=3)
    qat_wrap(model, bits=3, group_size=G, embedding_bits=8)
    seen = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "parametrizations")}
    qat_unwrap(model)
    quantize_linears(model, 3, G, scheme="affine", embedding_bits=8)
    assert all(torch.equal(model.get_submodule(n).weight, w) for n, w in seen.items())


def test_mlx_export_holds_embedding_at_embedding_bits(student, quantized):
    """MLX q2 with embedding_bits=4 from the fp32 student: verified in MLX against torch; the file's embedding is
    packed at 4 bits and the layers at 2 (config names the embedding with its own bits); its dequantized
    embedding is exactly our 4-bit grid; bits per weight counts codes, fp16 scales and biases and fp32 norms.
    The quantize folder exports with the width it records."""
    mx = pytest.importorskip("mlx.core")
    from distillery.export import export_model

    model, src = student
    rep = export_model(src, "mlx", src.parent / "mlx-q2e4", "q2", verify_tokens=128, group_size=G, embedding_bits=4)
    assert rep["verification"]["passed"] and rep["verification"]["greedy_identical"]
    assert rep["verification"]["max_abs_diff"] <= 1e-4
    path = src.parent / "mlx-q2e4"
    cfg = json.loads((path / "config.json").read_text())["quantization"]
    assert cfg["bits"] == 2 and cfg["model.embed_tokens"] == {"group_size": G, "bits": 4, "mode": "affine"}
    arrays = mx.load(str(path / "model.safetensors"))
    assert arrays["model.embed_tokens.weight"].shape == (512, 64 * 4 // 32)
    assert arrays["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64 * 2 // 32)
    deq = mx.dequantize(arrays["model.embed_tokens.weight"], arrays["model.embed_tokens.scales"].astype(mx.float32),
                        arrays["model.embed_tokens.biases"].astype(mx.float32), group_size=G, bits=4)
    q, s, b = affine_quantize(model.model.embed_tokens.weight, 4, G)   # fp32 codes, scale and bias stored fp16
    ours = affine_dequantize(q, s.half().float(), b.half().float())
    assert torch.equal(torch.from_numpy(np.array(deq)), ours)
    n_emb = 512 * 64
    n_lin = 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128)          # q, o 64x64; k, v 32x64 (2 KV heads); MLP
    n_norm = 64 * (2 * 2 + 1)
    assert rep["parameters"] == n_emb + n_lin + n_norm
    expected = (n_emb * (4 + 1) + n_lin * (2 + 1) + n_norm * 32) / rep["parameters"]   # +1: two fp16 per 32
    assert rep["bits_per_weight"] == pytest.approx(expected, rel=1e-9) and rep["embedding_bits"] == 4
    again = export_model(quantized["out_dir"], "mlx", src.parent / "mlx-from-q", "q2", verify_tokens=64, group_size=G)
    assert again["embedding_bits"] == 4
    assert json.loads((src.parent / "mlx-from-q" / "config.json").read_text())["quantization"]["model.embed_tokens"]["bits"] == 4


def test_qat_distill_trains_through_embedding_bits(tmp_path):
    """``qat.embedding_bits`` in a recipe reaches the training loop's qat_wrap: the run's embedding trained on the
    4-bit grid (its parametrization, observed during the run) beside 2-bit layers."""
    import distillery.quantize
    from distillery.quantize.qat import qat_wrap as real_wrap
    from distillery.train import distill

    seen = {}

    def spy(model, **kw):                  # the real qat_wrap, recording what it wrapped at which width
        names = real_wrap(model, **kw)
        seen.update({n: model.get_submodule(n).parametrizations.weight[0].bits for n in names})
        return names

    recipe = write_recipe(tmp_path, tmp_path / "run", qat={"enabled": True, "bits": 2, "group_size": 32,
                                                          "embedding_bits": 4, "last_steps": 2},
                          train={"max_steps": 2, "eval_every": 0, "save_every": 2})
    distillery.quantize.qat_wrap = spy
    try:
        distill(load_config(recipe, []))
    finally:
        del distillery.quantize.qat_wrap
    assert seen["model.embed_tokens"] == 4 and seen["model.layers.0.mlp.down_proj"] == 2


def test_bad_embedding_bits_are_one_line_errors(student, tmp_path):
    _, src = student
    model = tiny_llama()
    with pytest.raises(DistilleryError, match="embedding_bits=5 is not a width"):
        qat_wrap(model, bits=2, group_size=G, embedding_bits=5)
    with pytest.raises(DistilleryError, match="needs the affine scheme"):
        qat_wrap(tiny_llama(), bits=8, embedding_bits=4)
    with pytest.raises(DistilleryError, match="kept fp32") as err:
        quantize_model(src, bits=3, group_size=G, embeddings=False, embedding_bits=4, out_dir=tmp_path / "x",
                       eval_tokens=0)
    assert "\n" not in str(err.value)
    recipe = write_recipe(tmp_path, tmp_path / "run")
    with pytest.raises(DistilleryError, match="embedding_bits"):
        load_config(recipe, ["qat.bits=4", "qat.embedding_bits=8"])       # 4 bits auto: GGUF's symmetric grid
    with pytest.raises(DistilleryError, match="embedding_bits"):
        load_config(recipe, ["qat.bits=2", "qat.embedding_bits=5"])
    assert load_config(recipe, ["qat.bits=2", "qat.embedding_bits=4"]).qat.embedding_bits == 4
    pytest.importorskip("mlx_lm")
    from distillery.export import export_model
    with pytest.raises(DistilleryError, match="needs a quantized --quant"):
        export_model(src, "mlx", tmp_path / "m", "f32", embedding_bits=4)
    with pytest.raises(DistilleryError, match="for --format mlx"):
        export_model(src, "gguf", tmp_path / "m.gguf", "f16", embedding_bits=4)
