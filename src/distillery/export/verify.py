"""Round-trip proof for an export: run the exported file in its runtime and compare with PyTorch.

The same held-out token ids (default: the tail of *Paradise Lost*, tokenized by the student's own
tokenizer) go through the PyTorch model and through the runtime, in windows of at most ``window``
tokens, each window from an empty context. Reported: max |Δlogit|, relative error, top-1 agreement
and KL(torch ‖ runtime). Thresholds on top-1 agreement (``THRESHOLDS``): f32/f16 ≥ 99 % of all
positions; q8_0 ≥ 99 % of the *decided* positions (torch's top-1 leads its runner-up by more than
``TIE_STD`` standard deviations of that position's logits, see :func:`decided_top1`); q4_0 reported only. For GGUF, llama.cpp's tokenizer must also reproduce the HF
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

THRESHOLDS = {"f32": 0.99, "f16": 0.99, "q8_0": 0.99, "q4_0": None}
# q8_0 is judged on decided positions only. Why: llama.cpp's q8_0 matmuls round the weights *and* the
# activations to 8 bits, which flips near-tied top-1/top-2 pairs of a correct file. Demo student
# (runs/bench/device_student, 512 Milton tokens, mean top-1 probability 0.15, logit std 2.4 per position):
# plain top-1 95.9 %, all 21 flips at gaps < 0.06 std (< 0.15 nats), KL(torch ‖ gguf) 0.002 nats/token;
# f16 100 %, torch on the Q8_0 weights alone 99.2 %: a correct file. Over gaps > 0.05 std: 99.8 %, while
# broken q8_0 files of the same student score 97.4 % (rope theta x0.1, KL 0.011) and 93.5 % (one down_proj
# x1.5, KL 0.025) there. The band is relative to the logits' spread because the rounding error scales
# with the logits (a tiny random model's std is 0.16: an absolute 0.1-nat band left 27 of 256 positions).
TIE_STD = {"q8_0": 0.05}
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


def decided_top1(ref, test, tie_std: float) -> tuple[float, int]:
    """Top-1 agreement of ``test`` with ``ref`` (logits ``(N, V)`` each) over the decided rows, where ref's top-1
    logit exceeds its runner-up by more than ``tie_std · std(ref row over V)`` (``log p1/p2`` in units of the
    row's spread); returns ``(agreement, rows)``. With no decided row, all rows count (never vacuously 1)."""
    ref, test = torch.as_tensor(np.asarray(ref)).float(), torch.as_tensor(np.asarray(test)).float()
    top2 = ref.topk(2, dim=-1).values                                    # (N, 2)
    decided = (top2[:, 0] - top2[:, 1]) > tie_std * ref.std(dim=-1)       # (N,)
    if not decided.any():
        decided = torch.ones_like(decided)
    agree = ref[decided].argmax(-1) == test[decided].argmax(-1)
    return float(agree.float().mean()), int(decided.sum())


def gguf_problems(result: dict, quant: str) -> list[str]:
    """Failed conditions of a llama.cpp check ``result`` (``compare_logits`` + decided top-1 + tokenizer)."""
    need, problems = THRESHOLDS[quant], []
    key = "top1_agreement_decided" if quant in TIE_STD else "top1_agreement"
    if need is not None and result[key] < need:
        where = f" where torch's top-1 leads by > {TIE_STD[quant]} std of its logits" if quant in TIE_STD else ""
        problems.append(f"top-1 agreement{where} {result[key]:.2%} < {need:.0%}")
    if result["tokenizer_agreement"] < 1.0:
        problems.append(f"llama.cpp tokenizes {result['tokenizer_first_mismatch']!r} differently from HF")
    return problems


def verify_gguf(path: str, model, tokenizer, quant: str, ids: list[int], window: int) -> dict:
    """Compare llama.cpp with PyTorch on ``ids``; ``passed`` / ``problems`` say whether the thresholds hold."""
    ref, got = torch_logits(model, ids, window), llamacpp_logits(path, ids, window)
    result = compare_logits(ref, got)
    tie = TIE_STD.get(quant, 0.0)
    result["top1_agreement_decided"], result["decided_positions"] = decided_top1(ref, got, tie)
    result["tie_std"] = tie
    result.update(tokenizer_agreement(path, tokenizer, sample_lines()))
    result["threshold_top1"] = THRESHOLDS[quant]
    problems = gguf_problems(result, quant)
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

