"""Core ML export: a stateful KV-cache ``.mlpackage`` (iOS 18 / macOS 15) converted by coremltools from a jit trace.

Model signature (what ``scripts/verify_coreml_mac.py`` and an app call, with ``state = model.make_state()``):

* inputs ``input_ids (1, T)`` int32 and ``causal_mask (1, 1, T, P + T)`` fp16 (0 where a query may
  attend, -inf elsewhere), ``1 <= T <= P + T <= max_seq_len``; ``P`` = tokens already in the cache;
* output ``logits (1, T, V)`` fp16;
* states ``cache_k_cache`` / ``cache_v_cache`` ``(n_layers, 1, n_kv_heads, max_seq_len, head_dim)`` fp16: each call
  writes its keys/values at positions ``P .. P+T-1`` and attends to ``0 .. P+T-1``.

The positions come from the shapes (``P = causal_mask.shape[-1] - T``), so the caller passes only
ids and the mask. :class:`StatefulLM` runs the Hugging Face decoder layers themselves with
:class:`SliceCache` as their cache; only the mask building is bypassed (the explicit mask input).

``quant``: ``f16`` (weights and compute fp16), ``q8`` (int8 linear symmetric per output channel),
``q4`` (int4 linear symmetric per block of ``group_size``), ``p4`` (4-bit k-means palettization,
one 16-entry table per group of ``group_size`` output channels) through ``coremltools.optimize.coreml``.
The tied embedding and LM head are one constant in the MIL program (coremltools' const
de-duplication), so the weight file holds it once.

``predict()`` exists only on macOS: on Linux the check is the PyTorch side of the very module that
was traced (cache path vs the plain model) plus the structure of the saved spec.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import DistilleryError
from .folders import folder_bytes, staged_folder
from .metrics import compare_logits

QUANTS = ("f16", "q8", "q4", "p4")
MANIFEST = "distillery_coreml.json"
PACKAGE = "model.mlpackage"
STATES = ("cache_k_cache", "cache_v_cache")   # coremltools' names for the buffers cache.k_cache / cache.v_cache
HINT = "coremltools is not installed: pip install 'distillery[apple]' (coremltools==9.0)"
TORCH_PARITY_MAX_ABS = 2e-3   # the traced module keeps its cache in fp16, as Core ML's states must be
WEIGHT_OPS = {"q8": "constexpr_blockwise_shift_scale", "q4": "constexpr_blockwise_shift_scale",
              "p4": "constexpr_lut_to_dense"}


class SliceCache(nn.Module):
    """KV cache as two registered buffers ``(L, 1, n_kv, max_len, head_dim)``, written by slice assignment.

    Implements the one method HF attention calls, ``update(keys, values, layer_idx, ...)`` with
    ``keys (1, n_kv, T, head_dim)``: store at ``P .. P+T-1`` (``P = end - T``), return ``[:end]``.
    coremltools turns the buffers into Core ML states and the slice assignments into state writes.
    """

    def __init__(self, n_layers: int, n_kv: int, max_len: int, head_dim: int):
        super().__init__()
        shape = (n_layers, 1, n_kv, max_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=torch.float16))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=torch.float16))
        self.end = 0

    def update(self, keys, values, layer_idx, *args, **kwargs):
        begin = self.end - keys.shape[2]
        self.k_cache[layer_idx, :, :, begin:self.end] = keys.to(torch.float16)
        self.v_cache[layer_idx, :, :, begin:self.end] = values.to(torch.float16)
        return (self.k_cache[layer_idx, :, :, :self.end].to(keys.dtype),
                self.v_cache[layer_idx, :, :, :self.end].to(values.dtype))


class StatefulLM(nn.Module):
    """``(input_ids (1, T), causal_mask (1, 1, T, P+T)) -> logits (1, T, V)`` over a HF Llama/Qwen2 model."""

    def __init__(self, model, max_len: int):
        super().__init__()
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        cfg = self.model.config
        cfg._attn_implementation = "eager"          # plain matmul/softmax ops that coremltools converts
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.cache = SliceCache(cfg.num_hidden_layers, cfg.num_key_value_heads or cfg.num_attention_heads,
                                max_len, head_dim)

    def forward(self, input_ids, causal_mask):
        n, end = input_ids.shape[1], causal_mask.shape[-1]
        self.cache.end = end
        positions = torch.arange(end - n, end).unsqueeze(0)           # (1, T)
        base = self.model.model
        h = base.embed_tokens(input_ids)                               # (1, T, d)
        rope = base.rotary_emb(h, positions)
        for layer in base.layers:
            h = layer(h, causal_mask, positions, self.cache, position_embeddings=rope)
            h = h[0] if isinstance(h, tuple) else h
        return self.model.lm_head(base.norm(h))                        # (1, T, V)


def causal_mask(n: int, end: int) -> torch.Tensor:
    """``(1, 1, n, end)``: query ``i`` (absolute position ``end - n + i``) sees keys ``0 .. end - n + i``."""
    return torch.triu(torch.full((n, end), float("-inf")), diagonal=end - n + 1)[None, None]


def _import_ct():
    try:
        import coremltools as ct
    except ImportError:
        raise DistilleryError(HINT) from None
    _register_int_converter()
    return ct


def _register_int_converter() -> None:
    """coremltools 9.0's ``int`` converter calls ``int()`` on a shape-(1,) constant, which NumPy ≥ 2.4 refuses."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch import ops, register_torch_op

    if getattr(ops, "_distillery_int", False):
        return

    def _int(context, node):
        x = ops._get_inputs(context, node, expected=1)[0]
        if x.can_be_folded_to_const() and np.ndim(x.val) > 0:
            context.add(mb.const(val=int(np.asarray(x.val).reshape(-1)[0]), name=node.name), node.name)
        else:
            ops._cast(context, node, int, "int32")

    register_torch_op(_int, torch_alias=["int"], override=True)
    ops._distillery_int = True


def _compress(ct, mlmodel, quant: str, group_size: int):
    from coremltools.optimize import coreml as cto

    if quant == "q8":
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel")
        return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(global_config=op))
    if quant == "q4":
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                         block_size=group_size)
        return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(global_config=op))
    op = cto.OpPalettizerConfig(mode="kmeans", nbits=4, granularity="per_grouped_channel", group_size=group_size)
    return cto.palettize_weights(mlmodel, cto.OptimizationConfig(global_config=op))


def write_coreml(model, tokenizer, out: Path, quant: str = "f16", group_size: int = 32, max_seq_len: int = 1024) -> dict:
    """Trace :class:`StatefulLM`, convert it with states, compress it, save ``out/model.mlpackage``; return a report."""
    ct = _import_ct()
    max_len = min(max_seq_len, model.config.max_position_embeddings)
    wrapper = StatefulLM(model, max_len).eval()
    ids, mask = torch.zeros(1, 3, dtype=torch.long), causal_mask(3, 5)   # P > 0 so shapes stay symbolic
    state_shape = tuple(wrapper.cache.k_cache.shape)
    span = ct.RangeDim(1, max_len)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(wrapper, (ids, mask), check_trace=False)
            mlmodel = ct.convert(
                traced, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                compute_precision=ct.precision.FLOAT16, skip_model_load=True,
                inputs=[ct.TensorType(name="input_ids", shape=(1, span), dtype=np.int32),
                        ct.TensorType(name="causal_mask", shape=(1, 1, span, ct.RangeDim(1, max_len)), dtype=np.float16)],
                outputs=[ct.TensorType(name="logits", dtype=np.float16)],
                states=[ct.StateType(wrapped_type=ct.TensorType(shape=state_shape, dtype=np.float16), name=f"cache.{n}")
                        for n in ("k_cache", "v_cache")])
            if quant != "f16":
                mlmodel = _compress(ct, mlmodel, quant, group_size)
    except DistilleryError:
        raise
    except Exception as exc:  # the converter raises many types; keep one line
        raise DistilleryError(f"Core ML conversion failed: {type(exc).__name__}: {exc}".splitlines()[0]) from exc
    with staged_folder(out) as tmp:
        mlmodel.save(str(tmp / PACKAGE))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        model.config.save_pretrained(tmp)
        manifest = {"format": "coreml", "quant": quant, "group_size": group_size if quant in ("q4", "p4") else None,
                    "max_seq_len": max_len, "package": PACKAGE, "state_shape": list(state_shape),
                    "minimum_deployment_target": "iOS18"}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return {"format": "coreml", "path": str(out), "quant": quant, "max_seq_len": max_len,
            "bytes": folder_bytes(out / PACKAGE)}


def spec_summary(package: Path) -> dict:
    """Inputs, outputs, states (name → shape), MIL op counts and weight-file size of a saved ``.mlpackage``."""
    ct = _import_ct()
    spec = ct.utils.load_spec(str(package))

    def shapes(features):
        out = {}
        for f in features:
            kind = f.type.WhichOneof("Type")
            arr = f.type.stateType.arrayType if kind == "stateType" else f.type.multiArrayType
            ranges = [[r.lowerBound, r.upperBound] for r in arr.shapeRange.sizeRanges] if kind != "stateType" else []
            out[f.name] = ranges or list(arr.shape)        # flexible inputs: [lower, upper] per dimension
        return out

    ops = Counter()
    for fn in spec.mlProgram.functions.values():
        for block in fn.block_specializations.values():
            ops.update(op.type for op in block.operations)
    weights = folder_bytes(package, "weight.bin")
    return {"inputs": shapes(spec.description.input), "outputs": shapes(spec.description.output),
            "states": shapes(spec.description.state), "ops": dict(ops), "weight_bytes": weights,
            "spec_version": spec.specificationVersion}


@torch.no_grad()
def stateful_logits(wrapper: StatefulLM, ids: list[int], prefill: int) -> np.ndarray:
    """Logits ``(N, V)`` through the cache path: ``ids[:prefill]`` in one call, then one token per call."""
    rows = [wrapper(torch.tensor([ids[:prefill]]), causal_mask(prefill, prefill))[0]]
    for i in range(prefill, len(ids)):
        rows.append(wrapper(torch.tensor([[ids[i]]]), causal_mask(1, i + 1))[0])
    return torch.cat(rows).float().numpy()


def verify_coreml(out: Path, model, ids: list[int], window: int, quant: str) -> dict:
    """Linux check: the traced module's cache path vs the plain model, and the spec's structure."""
    from .verify import torch_logits

    manifest = json.loads((Path(out) / MANIFEST).read_text())
    n = min(window, manifest["max_seq_len"], len(ids))
    wrapper = StatefulLM(model, manifest["max_seq_len"])
    ref = torch_logits(model, ids[:n], n)
    result = {"torch_cache_path": compare_logits(ref, stateful_logits(wrapper, ids[:n], n // 2))}
    summary = spec_summary(Path(out) / PACKAGE)
    result["spec"] = summary
    cfg, max_len = model.config, manifest["max_seq_len"]
    problems = []
    if result["torch_cache_path"]["max_abs_diff"] > TORCH_PARITY_MAX_ABS:
        problems.append(f"cache path max |Δ| {result['torch_cache_path']['max_abs_diff']:.2e} > {TORCH_PARITY_MAX_ABS:.0e}")
    span = [1, max_len]
    if summary["inputs"] != {"input_ids": [[1, 1], span], "causal_mask": [[1, 1], [1, 1], span, span]} \
            or list(summary["outputs"]) != ["logits"]:
        problems.append(f"inputs {summary['inputs']} / outputs {list(summary['outputs'])} are not the documented ones")
    if sorted(summary["states"]) != list(STATES) or any(
            s != manifest["state_shape"] for s in summary["states"].values()):
        problems.append(f"states {summary['states']} do not match {manifest['state_shape']}")
    if manifest["state_shape"][0] != cfg.num_hidden_layers or manifest["state_shape"][3] != max_len:
        problems.append(f"state shape {manifest['state_shape']} does not fit the model")
    if quant in WEIGHT_OPS and not summary["ops"].get(WEIGHT_OPS[quant]):
        problems.append(f"no {WEIGHT_OPS[quant]} op: the weights were not compressed")
    result["reference"] = "PyTorch: the traced StatefulLM (fp16 cache) vs the plain model; predict() needs macOS"
    result["passed"], result["problems"] = not problems, problems
    return result
