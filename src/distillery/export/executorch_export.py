"""ExecuTorch export (iOS / Android, XNNPACK CPU delegate): ``model.pte`` + ``model.ptd``, run by ``executorch.runtime``.

Path: transformers' static-cache wrapper (``TorchExportableModuleForDecoderOnlyLM``: the KV cache is a
set of mutable buffers ``(1, n_kv_heads, max_seq_len, head_dim)`` per layer inside the program) →
``torch.export(strict=True)`` with a dynamic sequence length ``1..max_seq_len`` →
``to_edge_transform_and_lower(XnnpackPartitioner)`` → ``to_executorch``.

Program signature (what the ExecuTorch LLM runner calls): ``forward(input_ids (1, T) int64,
cache_position (T,) int64) -> logits (1, T, V)``; ``cache_position`` holds the absolute positions of
the ``T`` tokens (``arange(P, P + T)`` after ``P`` cached ones): prefill is one call with ``P = 0``,
decode calls ``T = 1``.

Weights live in ``model.ptd`` (ExecuTorch's external data file), not in the ``.pte``: the embedding
table (a program constant, read by the portable ``embedding`` kernel) and the XNNPACK LM-head weight
of a tied model are the same bytes, and the shared named-data store writes identical blobs once
(it deduplicates by content). Inside one ``.pte`` the two would be stored twice (XNNPACK has no
gather op to read the table).

``quant``: ``f32``, or ``8da4w`` — linear layers (LM head included) with int8 dynamic per-token
activations and int4 symmetric weights in groups of ``group_size`` (torchao
``Int8DynamicActivationIntxWeightConfig``, lowered to XNNPACK's QD8-QB4W GEMMs). A tied model's
embedding lookup reads the head's int4 weight (``TiedInt4Embedding``: the bytes XNNPACK stores, so
the named-data store keeps one copy); an untied embedding is int8 per group
(``quantized_decomposed.embedding_byte``).
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import DistilleryError
from .device_check import GREEDY_NEW, GREEDY_PROMPT, greedy_fields, torch_greedy, verdict
from .folders import folder_bytes, staged_folder
from .metrics import compare_logits

QUANTS = ("f32", "8da4w")
MANIFEST = "distillery_executorch.json"
DATA_TAG = "model"                           # -> model.ptd
HINT = "ExecuTorch is not installed: pip install 'distillery[apple]' (executorch==1.5.1)"
PARITY_REL_8DA4W = 2e-2   # least tolerance on rel_error for 8da4w (a small model's own noise floor is lower)
PARITY_KL_8DA4W = 1e-3    # least tolerance on KL(reference || runtime), nats per position
NOISE_REL, NOISE_SEEDS = 2.0 ** -23, (0, 1)   # one fp32 ulp of relative noise on every quantized linear's input


def _import_executorch():
    try:
        import executorch.exir  # noqa: F401
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    except ImportError:
        raise DistilleryError(HINT) from None
    return XnnpackPartitioner


class TiedInt4Embedding(torch.nn.Module):
    """Embedding lookup on a tied LM head's int4 weight, stored in the layout XNNPACK serializes it in.

    ``head`` is torchao's ``IntxUnpackedToInt8Tensor`` of the head: ``qdata`` (V, d) int8 in [-8, 7],
    ``scale`` (V, d/g) symmetric per group of ``g`` (zero points 0). Buffers:
    ``packed`` (V, d/2) uint8 with byte ``j`` of row ``v`` = ``(q[v,2j+1]+8) << 4 | (q[v,2j]+8)``
    (XNNPACK's ``convert_to_qc4w``: even column in the low nibble) and ``scale`` (V, d/g) bfloat16
    (XNNPACK keeps per-group scales in bf16; ``prepared`` has already rounded them). These are byte
    for byte the head's blobs, so the external data store writes the table once. Forward, ``ids``
    (B, T) → ``x[b,t,i] = q[ids[b,t], i] · scale[ids[b,t], i // g]`` (B, T, d) fp32, from row gathers
    and nibble arithmetic that ExecuTorch's portable kernels run (executorch's ``embedding_4bit``
    packs the nibbles the other way round, so it cannot read XNNPACK's bytes).
    """

    def __init__(self, head):
        super().__init__()
        if head.zero_point.abs().max() != 0 or head.block_size[0] != 1:
            raise DistilleryError("the tied int4 head is not symmetric per row group; cannot share it")
        q = (head.qdata.to(torch.int16) + 8).to(torch.uint8).contiguous()       # (V, d) in [0, 15]
        self.register_buffer("packed", (q[:, 1::2] << 4 | q[:, ::2]).contiguous())
        self.register_buffer("scale", head.scale.to(torch.bfloat16).contiguous())
        self.group = head.block_size[1]

    def forward(self, ids):
        rows = torch.nn.functional.embedding(ids, self.packed)                 # (B, T, d/2) uint8
        hi = torch.div(rows, 16, rounding_mode="floor")                         # core ATen ops only (no >>)
        q = torch.stack((rows - hi * 16, hi), dim=-1).flatten(-2).float() - 8   # (B, T, d)
        s = torch.nn.functional.embedding(ids, self.scale).float()   # (B, T, d/g); cast after the gather so
        return (q.unflatten(-1, (s.shape[-1], self.group)) * s.unsqueeze(-1)).flatten(-2)  # no f32 table is folded


def prepared(model, quant: str, group_size: int):
    """A frozen copy of ``model`` as it is exported: for ``8da4w`` quantized in place by torchao.

    Also the PyTorch reference of the parity check (torchao's reference kernels compute the same
    int8-activation / int4-weight products XNNPACK does, with the bf16-rounded scales XNNPACK stores).
    A tied table becomes ``TiedInt4Embedding`` on the int4 head; an untied one int8 per group.
    ``padding_idx`` only shapes gradients; it is dropped because it hides the embedding from
    ExecuTorch's quantized-embedding fusion.
    """
    m = copy.deepcopy(model).eval().requires_grad_(False)
    m.model.embed_tokens.padding_idx = None
    if quant == "8da4w":
        from executorch.extension.llm.export.quantize import quantize_model_

        bad = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and mod.in_features % group_size]
        if bad:
            raise DistilleryError(f"--group-size {group_size} does not divide the input width of {bad[0]}")
        tied = m.lm_head.weight is m.model.embed_tokens.weight
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_model_(m, qlinear_config="8da4w", qlinear_group_size=group_size,
                            qembedding_config=None if tied else "8w", qembedding_group_size=group_size)
        for mod in m.modules():   # XNNPACK stores int4 group scales in bf16: the reference uses those values
            if isinstance(mod, torch.nn.Linear):
                mod.weight.scale.copy_(mod.weight.scale.to(torch.bfloat16).to(mod.weight.scale.dtype))
        if tied:   # quantize_ gave the head its own tensor; the lookup reads that one's int4 bytes
            m.model.embed_tokens = TiedInt4Embedding(m.lm_head.weight)
    return m


@torch.no_grad()
def reference_noise_floor(ref_model, ids: list[int], window: int, ref: np.ndarray | None = None) -> dict:
    """How far the 8da4w reference moves under fp32 rounding noise: the tolerance of its parity check.

    Each quantized linear's input ``x`` becomes ``x · (1 + ε·z)``, ``z ~ N(0, 1)`` per element, ``ε = 2⁻²³``
    (one fp32 ulp: what another summation order in an upstream kernel changes), for each seed of
    ``NOISE_SEEDS``; returned: the largest ``rel_error`` and ``kl_ref_test`` and the lowest ``top1_agreement``
    of those runs against the unperturbed reference. Why a measured floor and not a fixed threshold: the
    int8 activations are quantized per token on the fly, so an ulp decides some roundings, and on a trained
    student the flips grow through the layers. On the demo student (8 layers, 128 Milton tokens) one-ulp noise
    alone moves the reference by rel 0.022-0.030, KL 0.003-0.006, top-1 90-98 %; XNNPACK's .pte sits inside
    that band (rel 0.023, KL 0.0042, top-1 96.9 %), while a broken file (one down_proj's scales x1.5) gives
    rel 0.10, KL 0.031 (a 1-layer model: XNNPACK within rel 8e-4). Subtler damage (x1.1: KL 0.010) is at
    the edge of what logits can show for such a model. ``ref``: the unperturbed logits, when already computed.
    """
    from .verify import torch_logits

    ref = torch_logits(ref_model, ids, window) if ref is None else ref
    linears = [m for m in ref_model.modules() if isinstance(m, torch.nn.Linear)]
    floor = {"rel_error": 0.0, "kl_ref_test": 0.0, "top1_agreement": 1.0, "epsilon": NOISE_REL,
             "seeds": list(NOISE_SEEDS)}
    for seed in NOISE_SEEDS:
        gen = torch.Generator().manual_seed(seed)

        def jitter(_mod, args, gen=gen):
            return (args[0] * (1 + NOISE_REL * torch.randn(args[0].shape, generator=gen)),) + tuple(args[1:])

        hooks = [m.register_forward_pre_hook(jitter) for m in linears]
        try:
            c = compare_logits(ref, torch_logits(ref_model, ids, window))
        finally:
            for h in hooks:
                h.remove()
        floor["rel_error"] = max(floor["rel_error"], c["rel_error"])
        floor["kl_ref_test"] = max(floor["kl_ref_test"], c["kl_ref_test"])
        floor["top1_agreement"] = min(floor["top1_agreement"], c["top1_agreement"])
    return floor


def quantized_tolerances(floor: dict) -> dict:
    """Twice the reference's own noise floor (at least the fixed minimums): rel error, KL, top-1 disagreement."""
    return {"rel_error": max(PARITY_REL_8DA4W, 2 * floor["rel_error"]),
            "kl_ref_test": max(PARITY_KL_8DA4W, 2 * floor["kl_ref_test"]),
            "top1_agreement": min(0.99, 1 - 2 * (1 - floor["top1_agreement"]))}


def _constant_methods(cfg, max_len: int) -> dict:
    """Metadata the ExecuTorch LLM runner reads from the program."""
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
    meta = {"get_max_seq_len": max_len, "get_max_context_len": max_len, "get_vocab_size": cfg.vocab_size,
            "use_kv_cache": True, "enable_dynamic_shape": True}
    if all(isinstance(e, int) for e in eos):
        meta["get_eos_ids"] = eos
    return meta


def _lower(m, max_len: int):
    """torch.export → edge → XNNPACK → ExecuTorch program; every constant tagged for ``model.ptd``."""
    XnnpackPartitioner = _import_executorch()
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from transformers import GenerationConfig
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    m.generation_config = GenerationConfig(use_cache=True, cache_implementation="static")
    wrapper = TorchExportableModuleForDecoderOnlyLM(m, batch_size=1, max_cache_len=max_len)
    seq = torch.export.Dim("seq", min=1, max=max_len)
    example = torch.zeros(1, 4, dtype=torch.long)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = wrapper.export(input_ids=example, cache_position=torch.arange(4),
                            dynamic_shapes={"input_ids": {1: seq}, "cache_position": {0: seq}}, strict=True)
        # Unwrap torchao's quantized weights into plain qdata/scale/zero-point placeholders first: untagged,
        # the ones lowering creates would put XNNPACK's int4 weights inside the .pte (as before: 8da4w .pte
        # 18 MB of 39 MB on the demo student) where they cannot share bytes with the gather table.
        ep = ep.run_decompositions({})
        sig = ep.graph_signature
        mutated = set(sig.buffers_to_mutate.values())
        weights = (set(sig.inputs_to_parameters) | set(sig.inputs_to_lifted_tensor_constants)
                   | {name for name, buf in sig.inputs_to_buffers.items() if buf not in mutated})
        for node in ep.graph.nodes:                  # XNNPACK puts tagged constants into the external file
            if node.op == "placeholder" and node.name in weights:
                node.meta.setdefault("custom", {})["delegate_constant_tag"] = DATA_TAG
        edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()],
                                           constant_methods=_constant_methods(m.config, max_len))
        return edge.to_executorch(ExecutorchBackendConfig(external_constants=lambda _node: DATA_TAG,
                                                          do_quant_fusion_and_const_prop=True))


def write_executorch(model, tokenizer, out: Path, quant: str = "f32", group_size: int = 32,
                     max_seq_len: int = 1024) -> dict:
    """Export ``model`` to ``out/model.pte`` + ``out/model.ptd`` (tokenizer and config beside); return a report."""
    _import_executorch()
    if quant == "8da4w":
        import executorch.kernels.quantized  # noqa: F401  (registers the quantized embedding ops)
    max_len = min(max_seq_len, model.config.max_position_embeddings)
    try:
        program = _lower(prepared(model, quant, group_size), max_len)
    except DistilleryError:
        raise
    except Exception as exc:  # export and lowering raise many types; keep one line
        raise DistilleryError(f"ExecuTorch export failed: {type(exc).__name__}: {exc}".splitlines()[0]) from exc
    with staged_folder(out) as tmp:
        with open(tmp / "model.pte", "wb") as fh:
            program.write_to_file(fh)
        program.write_tensor_data_to_file(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        model.config.save_pretrained(tmp)
        manifest = {"format": "executorch", "quant": quant, "group_size": group_size if quant != "f32" else None,
                    "max_seq_len": max_len, "backend": "xnnpack", "program": "model.pte", "data": f"{DATA_TAG}.ptd",
                    "inputs": ["input_ids (1, T) int64", "cache_position (T,) int64"], "outputs": ["logits (1, T, V)"]}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return {"format": "executorch", "path": str(out), "quant": quant, "max_seq_len": max_len,
            "bytes": folder_bytes(out, "model.pt*"), "pte_bytes": (out / "model.pte").stat().st_size}


def load_method(out: Path):
    """The ``forward`` method of an exported folder, loaded with its ``.ptd`` weights."""
    _import_executorch()
    from executorch.runtime import Runtime

    manifest = json.loads((Path(out) / MANIFEST).read_text())
    if manifest["quant"] != "f32":
        import executorch.kernels.quantized  # noqa: F401  (the int8 embedding kernel lives in this library)
    program = Runtime.get().load_program(Path(out) / manifest["program"], data_path=Path(out) / manifest["data"])
    return program.load_method("forward"), manifest


def pte_forward(method, ids: list[int], start: int) -> np.ndarray:
    """Logits ``(T, V)`` for ``ids`` placed at positions ``start .. start + T - 1`` of the static cache."""
    out = method.execute([torch.tensor([ids], dtype=torch.long), torch.arange(start, start + len(ids))])
    return out[0][0].float().numpy()


def _pte_greedy(method, prompt: list[int], n_new: int) -> list[int]:
    logits, tokens = pte_forward(method, prompt, 0), []
    for i in range(n_new):
        tokens.append(int(logits[-1].argmax()))
        logits = pte_forward(method, [tokens[-1]], len(prompt) + i)
    return tokens


def verify_executorch(out: Path, model, ids: list[int], window: int, quant: str, group_size: int) -> dict:
    """Prefill and KV-cache decode logits of the ``.pte`` against PyTorch, greedy tokens, fidelity to fp32."""
    from .verify import _windows, torch_logits

    method, manifest = load_method(out)
    window = min(window, manifest["max_seq_len"])
    ref_model = prepared(model, quant, group_size)
    ref = torch_logits(ref_model, ids, window)
    got = np.concatenate([pte_forward(method, w, 0) for w in _windows(ids, window)])
    result = {"fidelity": compare_logits(torch_logits(model, ids, window), got)}
    result.update(compare_logits(ref, got))
    first, half = ids[:window], len(ids[:window]) // 2
    cached = [pte_forward(method, first[:half], 0)] + [pte_forward(method, [t], half + i)
                                                       for i, t in enumerate(first[half:])]
    kv = compare_logits(ref[:len(first)], np.concatenate(cached))
    result["kv_cache_max_abs_diff"], result["kv_cache_rel_error"] = kv["max_abs_diff"], kv["rel_error"]
    prompt = ids[:GREEDY_PROMPT]
    result.update(greedy_fields(torch_greedy(ref_model, prompt, GREEDY_NEW), _pte_greedy(method, prompt, GREEDY_NEW)))
    if quant == "f32":
        result["reference"] = "torch fp32 (eager)"
        return verdict(result, quant)
    result["reference"] = "torch running the same torchao 8da4w model (reference kernels)"
    result["reference_noise_floor"] = floor = reference_noise_floor(ref_model, ids, window, ref)
    tol = quantized_tolerances(floor)
    result = verdict(result, quant, parity_max_abs=float("inf"), top1_min=tol["top1_agreement"])
    for key, limit in (("rel_error", tol["rel_error"]), ("kv_cache_rel_error", tol["rel_error"]),
                       ("kl_ref_test", tol["kl_ref_test"])):
        if result[key] > limit:
            result["problems"].append(f"{key} {result[key]:.2e} > {limit:.2e} (twice the reference's own "
                                      "noise floor, or the fixed minimum)")
    result["threshold_rel_error"], result["threshold_kl"] = tol["rel_error"], tol["kl_ref_test"]
    result["passed"] = not result["problems"]
    return result
