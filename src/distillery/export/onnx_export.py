"""ONNX export of a HF causal LM with KV-cache inputs and outputs (``torch.onnx.export(dynamo=True)``).

Graph signature (names follow the Optimum / ONNX Runtime GenAI convention):

* inputs: ``input_ids (B, T)`` int64, ``attention_mask (B, P + T)`` int64 (1 = real token; left
  padding allowed), ``past_key_values.<i>.key`` / ``.value`` ``(B, n_kv_heads, P, head_dim)`` fp32 for
  every layer ``i``; ``P = 0`` (empty tensors) on the first call.
* outputs: ``logits (B, T, V)`` and ``present.<i>.key`` / ``.value`` ``(B, n_kv_heads, P + T, head_dim)``,
  to be fed back as the next call's past.

``B``, ``T`` and ``P`` are dynamic. Position ids are computed inside the graph from the attention
mask (``cumsum - 1``), so callers only pass ids, mask and the cache. The tokenizer files and
``config.json`` are written next to ``model.onnx`` so the folder is self-contained.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import DistilleryError

MANIFEST = "distillery_onnx.json"


class CausalLMWithCache(nn.Module):
    """Flat-tensor wrapper: ``(input_ids, attention_mask, past tensors...) -> (logits, present tensors...)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.n_layers = model.config.num_hidden_layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.n_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]   # (B, T)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                         past_key_values=cache, use_cache=True)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    """(input names, output names) of the exported graph."""
    kv = [(i, k) for i in range(n_layers) for k in ("key", "value")]
    return (["input_ids", "attention_mask"] + [f"past_key_values.{i}.{k}" for i, k in kv],
            ["logits"] + [f"present.{i}.{k}" for i, k in kv])


def kv_shape(config) -> tuple[int, int]:
    """(n_kv_heads, head_dim) of the cache tensors."""
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    return (config.num_key_value_heads or n_head), head_dim


def write_onnx(model, tokenizer, out_dir: str | Path) -> dict:
    """Export ``model`` (fp32) to ``out_dir/model.onnx`` with KV cache; save tokenizer and config beside it."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DistilleryError(f"ONNX output '{out}' is a file; give a folder")
    if any(p.dtype != torch.float32 for p in model.parameters()):
        # not model.float(): transformers refuses it on configs that carry a quantization_config
        model = model.to(torch.float32)
    model.eval()
    cfg = model.config
    n_layers = cfg.num_hidden_layers
    n_kv, head_dim = kv_shape(cfg)
    batch, seq, past_len, total = (torch.export.Dim(n) for n in ("batch", "seq", "past_len", "total"))
    example_b, example_t, example_p = 2, 5, 3
    ids = torch.randint(0, cfg.vocab_size, (example_b, example_t))
    mask = torch.ones(example_b, example_p + example_t, dtype=torch.long)
    past = tuple(torch.zeros(example_b, n_kv, example_p, head_dim) for _ in range(2 * n_layers))
    shapes = ({0: batch, 1: seq}, {0: batch, 1: total}, tuple({0: batch, 2: past_len} for _ in past))
    in_names, out_names = io_names(n_layers)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".onnx-partial-", dir=out))
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(CausalLMWithCache(model).eval(), (ids, mask, *past), dynamo=True,
                                        dynamic_shapes=shapes, input_names=in_names, output_names=out_names,
                                        optimize=True, verbose=False)
            program.save(str(tmp / "model.onnx"), external_data=_needs_external_data(model))
        for f in tmp.iterdir():
            shutil.move(str(f), out / f.name)
    except DistilleryError:
        raise
    except Exception as exc:  # the exporter raises many types; name the model, keep one line
        raise DistilleryError(f"ONNX export failed for {type(model).__name__}: {type(exc).__name__}: {exc}".splitlines()[0]) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    cfg.save_pretrained(out)
    manifest = {"inputs": in_names, "outputs": out_names, "kv_cache": True, "n_layers": n_layers,
                "n_kv_heads": n_kv, "head_dim": head_dim, "vocab_size": cfg.vocab_size, "dtype": "float32"}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    size = sum(f.stat().st_size for f in out.iterdir() if f.name.startswith("model.onnx"))
    return {"format": "onnx", "path": str(out / "model.onnx"), "quant": "f32", "bytes": size, "kv_cache": True,
            "opset": _opset(out / "model.onnx")}


def _needs_external_data(model) -> bool:
    """Protobuf files stop at 2 GB: put weights in ``model.onnx.data`` above ~1.5 GB."""
    return sum(p.numel() * 4 for p in model.parameters()) > 1_500_000_000


def _opset(path: Path) -> int | None:
    try:
        import onnx

        m = onnx.load(str(path), load_external_data=False)
        return next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    except Exception:  # informational only
        return None
