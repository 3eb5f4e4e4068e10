"""Running an exported ONNX graph (see ``onnx_export``) with ONNX Runtime, without importing torch."""

from __future__ import annotations

import os

import numpy as np


def onnx_session(path: str, threads: int | None = None):
    """An ONNX Runtime CPU session for ``path`` using ``threads`` intra-op threads (default: all cores)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count() or 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_empty_past(session, batch: int) -> dict[str, np.ndarray]:
    """Zero-length cache tensors ``(B, n_kv, 0, head_dim)`` for every past input of ``session``."""
    return {inp.name: np.zeros((batch, inp.shape[1], 0, inp.shape[3]), dtype=np.float32)
            for inp in session.get_inputs() if inp.name.startswith("past_key_values.")}


def onnx_forward(session, ids: np.ndarray, past: dict[str, np.ndarray] | None = None, past_len: int = 0):
    """One call: ``ids (B, T)`` after ``past_len`` cached positions; returns ``(logits (B, T, V), next past)``."""
    b, t = ids.shape
    feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((b, past_len + t), dtype=np.int64)}
    feeds.update(past if past is not None else onnx_empty_past(session, b))
    outs = session.run(None, feeds)
    names = [o.name for o in session.get_outputs()]
    present = {n.replace("present.", "past_key_values.", 1): v for n, v in zip(names[1:], outs[1:])}
    return outs[0], present
