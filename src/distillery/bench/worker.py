"""One benchmark run in a fresh process: ``python -m distillery.bench.worker '<json spec>'``.

Prints one JSON object on stdout: ``load_s``, ``prefill_tok_s`` (a ``prompt_tokens``-token prompt
in one call), ``decode_tok_s`` (``new_tokens`` greedy tokens one at a time with the KV cache, batch 1),
``base_rss_bytes`` (after imports, before the model) and ``peak_rss_bytes`` (the process's
high-water mark). A short warm-up call precedes the timed prefill so that one-time kernel set-up is
not billed to it; the load time includes everything up to a ready model.

The spec: ``{"runtime": "torch|llamacpp|onnx|mlx|executorch", "path": ..., "prompt_tokens": 512, "new_tokens": 128,
"threads": 2, "text": null}``. Prompt tokens come from ``text`` (default: the tail of *Paradise
Lost*), tokenized by the model's own tokenizer, repeated if too short.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np


def _rss_peak() -> int:
    """Peak resident set size of this process, bytes.

    ``VmHWM`` from /proc is per address space, so it starts afresh at ``exec``; ``getrusage``'s
    ``ru_maxrss`` would carry over the high-water mark of the (possibly large) parent process.
    """
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # non-Linux fallback (KiB on Linux)


def _prompt(ids: list[int], n: int) -> list[int]:
    reps = -(-n // max(1, len(ids)))
    return (ids * reps)[:n]


def _text(spec: dict) -> str:
    if spec.get("text"):
        return spec["text"]
    from distillery.export.inputs import heldout_text

    return heldout_text(max(20_000, spec["prompt_tokens"] * 8))


def run_torch(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(spec["threads"])
    base = _rss_peak()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(spec["path"])
    load = time.perf_counter() - t0
    ids = _prompt(tok(_text(spec), add_special_tokens=False)["input_ids"], spec["prompt_tokens"])
    with torch.inference_mode():
        model(torch.tensor([ids[:8]]))                                     # warm-up
        t0 = time.perf_counter()
        out = model(torch.tensor([ids]), use_cache=True)
        prefill = time.perf_counter() - t0
        past, nxt = out.past_key_values, out.logits[0, -1].argmax()
        t0 = time.perf_counter()
        for _ in range(spec["new_tokens"]):
            out = model(nxt.view(1, 1), past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[0, -1].argmax()
        decode = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in Path(spec["path"]).glob("*.safetensors"))
    return {"load_s": load, "prefill_s": prefill, "decode_s": decode, "base_rss_bytes": base, "file_bytes": size}


def run_llamacpp(spec: dict) -> dict:
    import llama_cpp

    base = _rss_peak()
    n_ctx = spec["prompt_tokens"] + spec["new_tokens"] + 16
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=spec["path"], n_ctx=n_ctx, n_batch=spec["prompt_tokens"],
                          n_ubatch=spec["prompt_tokens"], logits_all=False, verbose=False, n_threads=spec["threads"],
                          n_threads_batch=spec["threads"])
    load = time.perf_counter() - t0
    n_vocab = llm.n_vocab()

    def last_argmax() -> int:
        return int(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,)).argmax())

    ids = _prompt(llm.tokenize(_text(spec).encode("utf-8"), add_bos=False, special=False), spec["prompt_tokens"])
    llm.eval(ids[:8])                                                      # warm-up
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - t0
    nxt = last_argmax()
    t0 = time.perf_counter()
    for _ in range(spec["new_tokens"]):
        llm.eval([nxt])
        nxt = last_argmax()
    decode = time.perf_counter() - t0
    llm.close()
    return {"load_s": load, "prefill_s": prefill, "decode_s": decode, "base_rss_bytes": base,
            "file_bytes": Path(spec["path"]).stat().st_size}


def run_onnx(spec: dict) -> dict:
    from tokenizers import Tokenizer

    from distillery.export.onnx_runtime import onnx_forward, onnx_session

    base = _rss_peak()
    path = Path(spec["path"])
    folder = path if path.is_dir() else path.parent
    t0 = time.perf_counter()
    session = onnx_session(str(folder / "model.onnx"), spec["threads"])
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    load = time.perf_counter() - t0
    ids = np.array([_prompt(tok.encode(_text(spec), add_special_tokens=False).ids, spec["prompt_tokens"])])
    onnx_forward(session, ids[:, :8])                                      # warm-up
    t0 = time.perf_counter()
    logits, past = onnx_forward(session, ids)
    prefill = time.perf_counter() - t0
    n = ids.shape[1]
    nxt = np.array([[logits[0, -1].argmax()]])
    t0 = time.perf_counter()
    for i in range(spec["new_tokens"]):
        logits, past = onnx_forward(session, nxt, past, past_len=n + i)
        nxt = np.array([[logits[0, -1].argmax()]])
    decode = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in folder.glob("model.onnx*"))
    return {"load_s": load, "prefill_s": prefill, "decode_s": decode, "base_rss_bytes": base, "file_bytes": size}


def run_mlx(spec: dict) -> dict:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    base = _rss_peak()
    t0 = time.perf_counter()
    model, tok = load(spec["path"])
    load_s = time.perf_counter() - t0
    ids = _prompt(tok.encode(_text(spec), add_special_tokens=False), spec["prompt_tokens"])
    mx.eval(model(mx.array([ids[:8]])))                                   # warm-up (MLX is lazy: eval forces it)
    cache = make_prompt_cache(model)
    t0 = time.perf_counter()
    logits = model(mx.array([ids]), cache=cache)
    nxt = mx.argmax(logits[0, -1]).item()
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(spec["new_tokens"]):
        nxt = mx.argmax(model(mx.array([[nxt]]), cache=cache)[0, -1]).item()
    decode = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in Path(spec["path"]).glob("*.safetensors"))
    return {"load_s": load_s, "prefill_s": prefill, "decode_s": decode, "base_rss_bytes": base, "file_bytes": size}


def run_executorch(spec: dict) -> dict:
    import executorch.runtime  # noqa: F401  (imported before the clock starts, as the other runtimes are)
    from tokenizers import Tokenizer

    from distillery.export.executorch_export import load_method, pte_forward

    base = _rss_peak()
    folder = Path(spec["path"])
    t0 = time.perf_counter()
    method, manifest = load_method(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    load = time.perf_counter() - t0
    if spec["prompt_tokens"] + spec["new_tokens"] > manifest["max_seq_len"]:
        raise SystemExit(f"prompt + new tokens exceed the program's max_seq_len {manifest['max_seq_len']}")
    ids = _prompt(tok.encode(_text(spec), add_special_tokens=False).ids, spec["prompt_tokens"])
    pte_forward(method, ids[:8], 0)                                       # warm-up
    t0 = time.perf_counter()
    nxt = int(pte_forward(method, ids, 0)[-1].argmax())
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(spec["new_tokens"]):
        nxt = int(pte_forward(method, [nxt], len(ids) + i)[-1].argmax())
    decode = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in folder.glob("model.pt*"))
    return {"load_s": load, "prefill_s": prefill, "decode_s": decode, "base_rss_bytes": base, "file_bytes": size}


RUNNERS = {"torch": run_torch, "llamacpp": run_llamacpp, "onnx": run_onnx, "mlx": run_mlx, "executorch": run_executorch}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    result = RUNNERS[spec["runtime"]](spec)
    result["prefill_tok_s"] = spec["prompt_tokens"] / result["prefill_s"]
    result["decode_tok_s"] = spec["new_tokens"] / result["decode_s"]
    result["peak_rss_bytes"] = _rss_peak()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
