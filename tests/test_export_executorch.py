"""ExecuTorch export (XNNPACK): prefill and KV-cache decode logits match PyTorch, greedy identical, tied weights stored once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("executorch.runtime")

from distillery.export import export_model  # noqa: E402
from distillery.export.executorch_export import (  # noqa: E402
    load_method, prepared, pte_forward, quantized_tolerances, reference_noise_floor)
from tiny import sharp_student_folder, tiny_llama  # noqa: E402


def _student(tmp_path_factory):
    return sharp_student_folder(tmp_path_factory.mktemp("student"))


@pytest.fixture(scope="module")
def f32(tmp_path_factory):
    model, src = _student(tmp_path_factory)
    return model, export_model(src, "executorch", src.parent / "et-f32", "f32", verify_tokens=128, max_seq_len=128)


def test_f32_prefill_decode_and_greedy_match_torch(f32):
    _, report = f32
    ver = report["verification"]
    assert ver["passed"] and ver["max_abs_diff"] <= 1e-4 and ver["kv_cache_max_abs_diff"] <= 1e-4
    assert ver["top1_agreement"] == 1.0 and ver["greedy_identical"] and ver["greedy_tokens"] == 32


def test_tied_embedding_stored_once(f32):
    """The weights live in model.ptd once: embedding table and XNNPACK LM head share one blob."""
    model, report = f32
    out = Path(report["path"])
    params = sum(p.numel() for p in model.parameters()) * 4          # tied: counted once
    emb = model.model.embed_tokens.weight.numel() * 4
    ptd = (out / "model.ptd").stat().st_size
    assert params <= ptd < params + emb / 4                            # a second copy would add `emb`
    assert (out / "model.pte").stat().st_size < emb / 2                # the program holds no weights
    manifest = json.loads((out / "distillery_executorch.json").read_text())
    assert manifest["max_seq_len"] == 128 and manifest["backend"] == "xnnpack"


def test_runtime_decode_positions_independent_of_history(f32):
    """Runtime directly: 9 tokens prefilled then 3 decoded == torch on all 12; a fresh prefill resets the cache."""
    model, report = f32
    method, _ = load_method(Path(report["path"]))
    torch.manual_seed(1)
    ids = torch.randint(0, 512, (12,)).tolist()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    for _ in range(2):                                                  # second round reuses the stale cache
        rows = [pte_forward(method, ids[:9], 0)] + [pte_forward(method, [t], 9 + i) for i, t in enumerate(ids[9:])]
        assert np.abs(np.concatenate(rows) - ref).max() <= 1e-4


def test_tied_8da4w_lookup_reads_the_heads_xnnpack_bytes():
    """The tied 8da4w table is the int4 head as XNNPACK serializes it (its own packing function), and the
    lookup returns the head's dequantized rows; an untied model keeps its int8 table."""
    from executorch.backends.xnnpack.operators.node_visitor import NodeVisitor

    m = prepared(tiny_llama(tie=True), "8da4w", 32)
    head, emb = m.lm_head.weight, m.model.embed_tokens
    assert torch.equal(emb.packed, NodeVisitor.convert_to_qc4w(head.qdata))
    assert emb.packed.shape == (512, 32) and emb.scale.dtype == torch.bfloat16 and emb.scale.shape == (512, 2)
    assert torch.equal(head.scale, emb.scale.float())                 # reference head reads the bf16 scales too
    ids = torch.tensor([[0, 7, 511, 7], [3, 1, 2, 100]])
    assert torch.equal(emb(ids), head.dequantize()[ids])
    assert head.qdata.min() >= -8 and head.qdata.max() <= 7 and len(head.qdata.unique()) > 8
    untied = prepared(tiny_llama(tie=False), "8da4w", 32).model.embed_tokens.weight
    assert untied.qdata.dtype == torch.int8 and untied.qdata.min() < -8      # int8 range: not the int4 path


def test_8da4w_noise_floor_measures_ulp_jitter_and_leaves_the_model_unchanged():
    """The 8da4w parity tolerance is measured: the reference against itself with one-ulp input noise on every
    quantized linear (two seeds, worst kept); the hooks are gone afterwards; tolerances are twice the floor."""
    from distillery.export.metrics import compare_logits
    from distillery.export.verify import torch_logits

    m = prepared(tiny_llama(tie=True), "8da4w", 32)
    ids = list(range(3, 200, 3))
    before = torch_logits(m, ids, 32)
    floor = reference_noise_floor(m, ids, 32)
    assert np.array_equal(torch_logits(m, ids, 32), before)                       # hooks removed
    assert floor == reference_noise_floor(m, ids, 32) == reference_noise_floor(m, ids, 32, before)  # seeded
    assert floor["epsilon"] == 2.0 ** -23 and floor["seeds"] == [0, 1]
    # the worst seed is what is kept: recompute seed 1 alone by hand
    gen, lin = torch.Generator().manual_seed(1), [x for x in m.modules() if isinstance(x, torch.nn.Linear)]
    hooks = [x.register_forward_pre_hook(lambda _m, a: (a[0] * (1 + 2.0 ** -23 * torch.randn(a[0].shape, generator=gen)),))
             for x in lin]
    one = compare_logits(before, torch_logits(m, ids, 32))
    for h in hooks:
        h.remove()
    assert floor["rel_error"] >= one["rel_error"] and floor["top1_agreement"] <= one["top1_agreement"]
    assert 0 <= floor["rel_error"] < 1e-2 and floor["kl_ref_test"] >= 0
    tol = quantized_tolerances({"rel_error": 0.03, "kl_ref_test": 0.006, "top1_agreement": 0.9})
    assert tol == pytest.approx({"rel_error": 0.06, "kl_ref_test": 0.012, "top1_agreement": 0.8})
    tol = quantized_tolerances({"rel_error": 1e-4, "kl_ref_test": 1e-6, "top1_agreement": 1.0})
    assert tol == {"rel_error": 2e-2, "kl_ref_test": 1e-3, "top1_agreement": 0.99}   # the fixed minimums


@pytest.mark.slow   # a second lowering: ~50 s of CPU on top of the fp32 one
def test_8da4w_smaller_and_matches_torchao_reference(tmp_path_factory, f32):
    model, src = _student(tmp_path_factory)
    report = export_model(src, "executorch", src.parent / "et-q", "8da4w", verify_tokens=128, max_seq_len=128)
    ver = report["verification"]
    assert ver["passed"] and ver["rel_error"] <= 2e-2 and ver["kv_cache_rel_error"] <= 2e-2
    assert ver["top1_agreement"] >= 0.99 and ver["greedy_identical"]
    assert ver["threshold_rel_error"] >= 2e-2 and ver["threshold_kl"] >= 1e-3 and "reference_noise_floor" in ver
    assert 1e-6 < ver["fidelity"]["kl_ref_test"] < 1e-2               # int4 weights cost something, not much
    assert report["bytes"] < f32[1]["bytes"] * 0.45
    # the tied table is in model.ptd once, as the int4 head's bytes; an int8 table beside it would add V*d bytes
    out, m = Path(report["path"]), prepared(model, "8da4w", 32)
    ptd, pte = (out / "model.ptd").read_bytes(), (out / "model.pte").read_bytes()
    table = m.model.embed_tokens.packed.numpy().tobytes()
    assert ptd.count(table) == 1 and pte.count(table) == 0
    params = sum(p.numel() for p in model.parameters())                 # tied: counted once
    assert len(ptd) < params / 2 * 1.3 < len(ptd) + model.model.embed_tokens.weight.numel()


def test_bench_runtime_executorch(f32):
    from distillery.bench import bench_models

    result = bench_models([f32[1]["path"]], runtime="executorch", prompt_tokens=32, new_tokens=8, repeats=1,
                          threads=1, show=False)
    s = result["models"][0]["summary"]
    assert s["file_bytes"]["median"] == f32[1]["bytes"] and s["decode_tok_s"]["median"] > 0
    assert s["peak_rss_bytes"]["median"] >= s["base_rss_bytes"]["median"] > 0
