"""Shared pieces of the MLX / ExecuTorch / Core ML round-trip checks: torch greedy decoding and the verdict.

Every device check compares the runtime with PyTorch twice:

* **parity** — the runtime against PyTorch running *the same weights* (for a quantized export:
  PyTorch on the weights dequantized from the file, or torchao's reference kernels), in fp32:
  max |Δlogit| over held-out tokens, full pass and KV-cache pass, and greedy tokens identical.
  This proves the file and the runtime compute what the model says.
* **fidelity** — the runtime against the original fp32 student: top-1 agreement and
  KL(student ‖ export). This measures what the rounding of the weights costs; it has a threshold
  only where the rounding is mild (f16, 8-bit), see :data:`FIDELITY_TOP1`.
"""

from __future__ import annotations

import torch

PARITY_MAX_ABS = 1e-3   # fp32 compute on identical weights: only summation order differs
FIDELITY_TOP1 = {"f32": 0.99, "f16": 0.99, "q8": 0.97}   # other bit widths: reported, no threshold
GREEDY_PROMPT, GREEDY_NEW = 16, 32


@torch.no_grad()
def torch_greedy(model, prompt: list[int], n_new: int) -> list[int]:
    """``n_new`` greedy tokens after ``prompt`` with the KV cache (batch 1, no stop token)."""
    out = model(torch.tensor([prompt]), use_cache=True)
    past, tokens = out.past_key_values, []
    for _ in range(n_new):
        nxt = int(out.logits[0, -1].argmax())
        tokens.append(nxt)
        out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
    return tokens


def verdict(result: dict, quant: str, parity_max_abs: float = PARITY_MAX_ABS, top1_min: float = 0.99) -> dict:
    """Add ``passed`` / ``problems`` to a result holding parity, KV-cache, greedy and fidelity numbers.

    ``top1_min``: the least top-1 agreement with PyTorch on the same weights (0.99; a dynamically quantized
    export passes its measured tolerance, ``executorch_export.quantized_tolerances``)."""
    problems = [f"{k} {result[k]:.2e} > {parity_max_abs:.0e}" for k in ("max_abs_diff", "kv_cache_max_abs_diff")
                if k in result and result[k] > parity_max_abs]
    if result.get("top1_agreement", 1.0) < top1_min:
        problems.append(f"top-1 agreement with PyTorch on the same weights {result['top1_agreement']:.2%} "
                        f"< {top1_min:.2%}")
    if result.get("greedy_identical") is False:
        problems.append(f"greedy tokens differ from PyTorch from step {result['greedy_first_mismatch']}")
    need = FIDELITY_TOP1.get(quant)
    result["threshold_fidelity_top1"] = need
    fid = result.get("fidelity", {}).get("top1_agreement")
    if need is not None and fid is not None and fid < need:
        problems.append(f"top-1 agreement with the fp32 student {fid:.2%} < {need:.0%}")
    result["threshold_max_abs"], result["threshold_top1"] = parity_max_abs, top1_min
    result["passed"], result["problems"] = not problems, problems
    return result


def greedy_fields(expected: list[int], got: list[int]) -> dict:
    """``greedy_identical`` and the first step where the two token lists differ (None when equal)."""
    first = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), None)
    if first is None and len(expected) != len(got):
        first = min(len(expected), len(got))
    return {"greedy_identical": first is None, "greedy_first_mismatch": first, "greedy_tokens": len(expected)}
