"""Round-trip proof for an export: run the exported file in its runtime and compare with PyTorch.

The same held-out token ids (default: the tail of *Paradise Lost*, tokenized by the student's own
tokenizer) go through the PyTorch model and through the runtime, in windows of at most ``window``
tokens, each window from an empty context. Reported: max |Δlogit|, relative error, top-1 agreement
and KL(torch ‖ runtime). Thresholds on top-1 agreement (``THRESHOLDS``): f32/f16 ≥ 99 %,
q8_0 ≥ 97 %, q4_0 reported only. For GGUF, llama.cpp's tokenizer must also reproduce the HF
tokenization of sample lines exactly; for ONNX, the KV-cache path (prefix, then the rest fed with the
returned cache) must give the same logits as one full pass.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import DistilleryError
from .inputs import heldout_text
from .metrics import compare_logits
from .onnx_runtime import onnx_forward, onnx_session

THRESHOLDS = {"f32": 0.99, "f16": 0.99, "q8_0": 0.97, "q4_0": None}
ONNX_MAX_ABS = 1e-3   # fp32 graph vs fp32 eager: only summation order differs
LLAMACPP_HINT = ("llama-cpp-python is not installed: pip install 'distillery[llamacpp]' "
                 "(or scripts/build_llamacpp_wheel.sh), or pass --no-verify")


def _windows(ids: list[int], window: int) -> list[list[int]]:
    return [ids[i:i + window] for i in range(0, len(ids), window) if len(ids[i:i + window]) > 1]


@torch.no_grad()
def torch_logits(model, ids: list[int], window: int) -> np.ndarray:
    """PyTorch logits ``(N, V)`` for ``ids``, window by window."""
    return np.concatenate([model(torch.tensor([w])).logits[0].float().numpy() for w in _windows(ids, window)])


def sample_lines(text: str | None = None, n: int = 100) -> list[str]:
    """``n`` sample strings for tokenizer checks: held-out lines, plus digits, spaces, unicode."""
    lines = [ln for ln in (text or heldout_text(40_000)).splitlines() if ln.strip()]
    extra = ["3 33 333 3333 1.5e-3, 2024-06-01", "  two  spaces\tand\ttabs\n\nnewlines ", "naïve café — “quotes” 🦙",
             "I'll we've they're DON'T", "<|im_start|>user\nhi<|im_end|>"]
    return (extra + lines)[:n]


def _llama(path: str, n_ctx: int, logits_all: bool):
    try:
        import llama_cpp
    except ImportError:
        raise DistilleryError(f"cannot verify {path}: {LLAMACPP_HINT}") from None
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=logits_all,
                               verbose=False, n_threads=max(1, torch.get_num_threads()))
    except (ValueError, RuntimeError) as exc:
        raise DistilleryError(f"llama.cpp cannot load {path}: {exc}".splitlines()[0]) from None


def llamacpp_logits(path: str, ids: list[int], window: int) -> np.ndarray:
    """llama.cpp logits ``(N, V)`` for ``ids`` (one fresh context per window)."""
    llm = _llama(path, window, logits_all=True)
    try:
        rows = []
        for w in _windows(ids, window):
            llm.reset()
            llm.eval(w)
            rows.append(np.array(llm.scores[:len(w)], dtype=np.float32))
        return np.concatenate(rows)
    finally:
        llm.close()


def tokenizer_agreement(path: str, tokenizer, samples: list[str]) -> dict:
    """Share of samples that llama.cpp tokenizes exactly like the HF tokenizer (special tokens in the text parsed as HF does)."""
    llm = _llama(path, 64, logits_all=False)
    try:
        bad = []
        for s in samples:
            hf = tokenizer(s, add_special_tokens=False)["input_ids"]
            if llm.tokenize(s.encode("utf-8"), add_bos=False, special=True) != hf:
                bad.append(s)
        return {"tokenizer_samples": len(samples), "tokenizer_agreement": 1 - len(bad) / max(1, len(samples)),
                "tokenizer_first_mismatch": bad[0][:80] if bad else None}
    finally:
        llm.close()


def verify_gguf(path: str, model, tokenizer, quant: str, ids: list[int], window: int) -> dict:
    """Compare llama.cpp with PyTorch on ``ids``; raise DistilleryError when a threshold fails."""
    result = compare_logits(torch_logits(model, ids, window), llamacpp_logits(path, ids, window))
    result.update(tokenizer_agreement(path, tokenizer, sample_lines()))
    result["threshold_top1"] = THRESHOLDS[quant]
    problems = []
    if THRESHOLDS[quant] is not None and result["top1_agreement"] < THRESHOLDS[quant]:
        problems.append(f"top-1 agreement {result['top1_agreement']:.2%} < {THRESHOLDS[quant]:.0%}")
    if result["tokenizer_agreement"] < 1.0:
        problems.append(f"llama.cpp tokenizes {result['tokenizer_first_mismatch']!r} differently from HF")
    result["passed"] = not problems
    result["problems"] = problems
    return result


def verify_onnx(path: str, model, ids: list[int], window: int) -> dict:
    """Full-pass and KV-cache-pass parity of the ONNX graph with PyTorch; raise-free, see ``passed``."""
    session = onnx_session(path)
    ref = torch_logits(model, ids, window)
    full, cached = [], []
    for w in _windows(ids, window):
        arr = np.array([w])
        full.append(onnx_forward(session, arr)[0][0])
        half = len(w) // 2
        first, past = onnx_forward(session, arr[:, :half])
        second, _ = onnx_forward(session, arr[:, half:], past, past_len=half)
        cached.append(np.concatenate([first[0], second[0]]))
    result = compare_logits(ref, np.concatenate(full))
    result["kv_cache_max_abs_diff"] = compare_logits(ref, np.concatenate(cached))["max_abs_diff"]
    result["threshold_top1"], result["threshold_max_abs"] = 0.99, ONNX_MAX_ABS
    problems = [f"{k} {result[k]:.2e} > {ONNX_MAX_ABS:.0e}" for k in ("max_abs_diff", "kv_cache_max_abs_diff")
                if result[k] > ONNX_MAX_ABS]
    if result["top1_agreement"] < 0.99:
        problems.append(f"top-1 agreement {result['top1_agreement']:.2%} < 99%")
    result["passed"], result["problems"] = not problems, problems
    return result

