"""Core ML export: a stateful KV-cache model converts; its spec has the documented inputs, states and weights.

``predict()`` runs only on macOS (scripts/verify_coreml_mac.py); here the PyTorch side of the traced
module (its cache path) is checked against the plain model, and the saved spec's structure is read back.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("coremltools")

from distillery.export import export_model  # noqa: E402
from distillery.export.coreml_export import StatefulLM, causal_mask, stateful_logits  # noqa: E402
from tiny import sharp_student_folder  # noqa: E402


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    model, src = sharp_student_folder(tmp_path_factory.mktemp("student"))
    reports = {q: export_model(src, "coreml", src.parent / f"cm-{q}", q, verify_tokens=128, max_seq_len=128)
               for q in ("f16", "q8", "q4")}
    return model, reports


def test_states_inputs_outputs(exports):
    _, reports = exports
    spec = reports["f16"]["verification"]["spec"]
    assert spec["inputs"] == {"input_ids": [[1, 1], [1, 128]], "causal_mask": [[1, 1], [1, 1], [1, 128], [1, 128]]}
    assert list(spec["outputs"]) == ["logits"]
    assert spec["states"] == {"cache_k_cache": [2, 1, 2, 128, 16], "cache_v_cache": [2, 1, 2, 128, 16]}
    assert spec["ops"]["write_state"] == 4 and spec["ops"]["read_state"] >= 4      # k and v per layer
    assert spec["spec_version"] >= 9                                                # iOS 18: states


def test_weights_tied_once_and_quantized_smaller(exports):
    model, reports = exports
    params = sum(p.numel() for p in model.parameters())                            # tied: counted once
    w = {q: r["verification"]["spec"]["weight_bytes"] for q, r in reports.items()}
    assert params * 2 <= w["f16"] < params * 2 * 1.05                               # fp16, embedding once
    assert w["q8"] < w["f16"] * 0.6 and w["q4"] < w["f16"] * 0.4
    assert reports["q8"]["verification"]["spec"]["ops"]["constexpr_blockwise_shift_scale"] >= 11
    assert all(r["verification"]["passed"] for r in reports.values())


def test_traced_cache_path_matches_plain_model(exports):
    """The module that was converted: prefill 5, then 7 single steps through the fp16 cache == full pass."""
    model, reports = exports
    assert reports["f16"]["verification"]["torch_cache_path"]["max_abs_diff"] <= 2e-3
    torch.manual_seed(2)
    ids = torch.randint(0, 512, (12,)).tolist()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    got = stateful_logits(StatefulLM(model, 32), ids, 5)
    assert got.shape == ref.shape and np.abs(got - ref).max() <= 2e-3
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_causal_mask_offsets():
    m = causal_mask(2, 5)[0, 0]
    assert torch.isinf(m).tolist() == [[False] * 4 + [True], [False] * 5]
