"""Held-out perplexity and BLiMP accuracy of a model *in its runtime*: torch, llama.cpp, ONNX Runtime, MLX, ExecuTorch.

One primitive carries both: :func:`open_scorer` loads a model in a runtime and returns
``logits(ids) -> (T, V) float32`` for a list of token ids run from an empty context (no KV cache
carried between calls). Every runtime is fed *the same token ids* (from the HF tokenizer of the
source folder), so rows differ only by what the runtime and its weights compute.

* Perplexity: independent windows; position ``t`` predicts token ``t + 1``, so a window of ``w``
  tokens contributes ``w - 1`` predictions; perplexity = exp(total NLL / predictions).
* BLiMP: ``log p(x) = sum_i log p(x_i | prefix, x_<i)`` per sentence, a pair right when
  ``log p(good) > log p(bad)`` — the convention and the prefix token of :mod:`distillery.tasks.blimp`
  (whose torch scorer batches; here each sentence is one call, which every runtime runs).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from ..errors import DistilleryError
from ..export.metrics import mean_nll

Logits = Callable[[list[int]], np.ndarray]
SCORER_RUNTIMES = ("torch", "llamacpp", "onnx", "mlx", "executorch")


def _windows(ids: list[int], window: int):
    for i in range(0, len(ids), window):
        chunk = ids[i:i + window]
        if len(chunk) > 1:
            yield chunk


@contextlib.contextmanager
def open_scorer(runtime: str, path: str | Path, threads: int = 1, max_tokens: int = 512) -> Iterator[Logits]:
    """Load ``path`` in ``runtime`` and yield ``logits(ids) -> (len(ids), V)`` float32 (``len(ids) <= max_tokens``).

    ``path``: an HF folder (torch), a ``.gguf`` file (llamacpp), an export folder of ``distillery export``
    (onnx, mlx, executorch). llama.cpp's context is sized ``max_tokens``; ExecuTorch's program holds its own
    ``max_seq_len``. The model is released when the ``with`` block ends (llama.cpp explicitly).
    """
    if runtime not in SCORER_RUNTIMES:
        raise DistilleryError(f"runtime '{runtime}' has no scorer (choose {', '.join(SCORER_RUNTIMES)})")
    path = Path(path)
    if runtime == "torch":
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

        def logits(ids):
            with torch.inference_mode():
                return model(torch.tensor([ids])).logits[0].float().numpy()
        yield logits
    elif runtime == "llamacpp":
        import llama_cpp

        llm = llama_cpp.Llama(model_path=str(path), n_ctx=max_tokens, n_batch=max_tokens, n_ubatch=max_tokens,
                              logits_all=True, verbose=False, n_threads=threads, n_threads_batch=threads)

        def logits(ids):
            llm.reset()
            llm.eval(ids)
            return np.asarray(llm.scores[:len(ids)], dtype=np.float32)
        try:
            yield logits
        finally:
            llm.close()
    elif runtime == "onnx":
        from ..export.onnx_runtime import onnx_forward, onnx_session

        session = onnx_session(str(path / "model.onnx" if path.is_dir() else path), threads)
        yield lambda ids: onnx_forward(session, np.array([ids]))[0][0].astype(np.float32)
    elif runtime == "mlx":
        import mlx.core as mx
        from mlx_lm import load

        model, _ = load(str(path))
        yield lambda ids: np.array(model(mx.array([ids]))[0].astype(mx.float32))
    else:
        from ..export.executorch_export import load_method, pte_forward

        method, manifest = load_method(path)
        if max_tokens > manifest["max_seq_len"]:
            raise DistilleryError(f"{path}: windows of {max_tokens} tokens exceed the program's "
                                  f"max_seq_len {manifest['max_seq_len']}")
        yield lambda ids: pte_forward(method, ids, 0)   # positions 0..T-1: stale cache rows beyond T are masked


def perplexity_windows(logits: Logits, windows: Iterable[list[int]]) -> dict:
    """Perplexity over independent windows (each a list of ids; ``w`` ids give ``w - 1`` predictions)."""
    nll, n = 0.0, 0
    for chunk in windows:
        if len(chunk) > 1:
            mean, count = mean_nll(logits(chunk), chunk)
            nll, n = nll + mean * count, n + count
    if n == 0:
        raise DistilleryError("perplexity: no window has two tokens")
    return {"perplexity": math.exp(nll / n), "predictions": n}


def blimp_runtime(logits: Logits, tokenizer, pairs: list[dict], prefix: str | None = None) -> dict:
    """BLiMP accuracy of one runtime model: :func:`distillery.tasks.blimp.accuracy_table` plus the prefix token.

    Sentence log-probability as in the module docstring; ``prefix`` as in ``tasks.blimp.sentence_logprobs``.
    """
    from ..tasks.blimp import _token_id, accuracy_table, prefix_token_id

    pid = prefix_token_id(tokenizer) if prefix is None else _token_id(tokenizer, prefix)

    def logprob(text: str) -> float:
        ids = ([pid] if pid is not None else []) + tokenizer(text, add_special_tokens=False)["input_ids"]
        z = logits(ids)[:-1].astype(np.float64)                                 # (T-1, V): predicts ids[1:]
        lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
        return float((z[np.arange(len(ids) - 1), ids[1:]] - lse).sum())

    correct = [logprob(p["good"]) > logprob(p["bad"]) for p in pairs]
    table = accuracy_table(pairs, correct)
    table["prefix_token"] = None if pid is None else tokenizer.convert_ids_to_tokens(pid)
    return table


def perplexity_torch(model, ids: list[int], window: int = 512) -> dict:
    """Perplexity of an in-memory HF model (fp32, eval) on ``ids``, windows of ``window`` tokens."""
    import torch

    def logits(chunk):
        with torch.inference_mode():
            return model(torch.tensor([chunk])).logits[0]
    return {**perplexity_windows(logits, _windows(ids, window)), "window": window}


def perplexity_llamacpp(path: str, ids: list[int], window: int = 512, threads: int = 1) -> dict:
    """Perplexity of a GGUF file in llama.cpp on ``ids`` (the same ids as the PyTorch run)."""
    with open_scorer("llamacpp", path, threads, max_tokens=window) as logits:
        return {**perplexity_windows(logits, _windows(ids, window)), "window": window}
