"""Held-out perplexity in PyTorch and in llama.cpp, window by window (never the whole (N, V) logits).

Both score the *same token ids* (from the HF tokenizer) in the same independent windows of
``window`` tokens, each from an empty context; position ``t`` predicts token ``t + 1``, so a window
of ``w`` tokens contributes ``w - 1`` predictions. Perplexity = exp(total NLL / predictions).
"""

from __future__ import annotations

import math

import numpy as np

from ..export.metrics import mean_nll


def _windows(ids: list[int], window: int):
    for i in range(0, len(ids), window):
        chunk = ids[i:i + window]
        if len(chunk) > 1:
            yield chunk


def perplexity_torch(model, ids: list[int], window: int = 512) -> dict:
    """Perplexity of a HF model (fp32, eval) on ``ids``."""
    import torch

    nll, n = 0.0, 0
    with torch.inference_mode():
        for chunk in _windows(ids, window):
            mean, count = mean_nll(model(torch.tensor([chunk])).logits[0], chunk)
            nll, n = nll + mean * count, n + count
    return {"perplexity": math.exp(nll / n), "predictions": n, "window": window}


def perplexity_llamacpp(path: str, ids: list[int], window: int = 512, threads: int = 1) -> dict:
    """Perplexity of a GGUF file in llama.cpp on ``ids`` (the same ids as the PyTorch run)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=window, n_batch=window, n_ubatch=window, logits_all=True,
                          verbose=False, n_threads=threads, n_threads_batch=threads)
    nll, n = 0.0, 0
    try:
        for chunk in _windows(ids, window):
            llm.reset()
            llm.eval(chunk)
            mean, count = mean_nll(np.asarray(llm.scores[:len(chunk)], dtype=np.float32), chunk)
            nll, n = nll + mean * count, n + count
    finally:
        llm.close()
    return {"perplexity": math.exp(nll / n), "predictions": n, "window": window}
