"""Minitron-style structured pruning: a student cut from the teacher, weights inherited.

``prune_model(teacher, calib_batches, layers=, hidden=, ffn=, heads=)`` measures importance on
calibration batches (``importance``), decides what to keep (``plan``) and slices the weights into a
fresh model of the teacher's own class (``slicing``). Depth (layers) and width (hidden channels,
MLP neurons, attention heads by whole KV groups) are all scored in one pass over the unpruned
teacher, as in Minitron. Supported: the causal LMs of ``SUPPORTED`` (Llama, Mistral, Qwen2/3, Gemma 1/2/3
text, Phi-3: ``slicing`` knows each one's tensors); anything else is refused with a :class:`DistilleryError`.

The result is a plain Hugging Face model: ``save_pretrained`` it and
``AutoModelForCausalLM.from_pretrained`` loads it without distillery. The command line verb is in
:mod:`distillery.prune.cli` (``distillery prune TEACHER OUT --layers ...``).
"""

from __future__ import annotations

from typing import Iterable, Literal

import torch

from ..errors import DistilleryError
from .importance import Calibration, calibrate, calibration_loss, loss_importance
from .plan import PrunePlan, check_target, choose_heads, choose_layers, kv_group_count, top_k
from .slicing import apply_plan, sized_config

SUPPORTED = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
             "mistral": "MistralForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
             "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM"}


def check_supported(model) -> None:
    """Refuse models pruning does not know: only the plain causal LMs of ``SUPPORTED`` are sliced."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    name = type(model).__name__
    if mt not in SUPPORTED or name != SUPPORTED[mt]:
        raise DistilleryError(f"prune: {name} (model_type '{mt}') is not supported; pruning works on "
                              f"{', '.join(SUPPORTED.values())}")
    n_heads, n_kv = model.config.num_attention_heads, model.config.num_key_value_heads or model.config.num_attention_heads
    if n_heads % n_kv:
        raise DistilleryError(f"prune: teacher has {n_heads} heads and {n_kv} KV heads (not a multiple)")


def plan_pruning(teacher, calib_batches: Iterable[dict], *, layers: int | None = None, hidden: int | None = None,
                 ffn: int | None = None, heads: int | None = None, kv_heads: int | None = None,
                 method: Literal["block_importance", "loss"] = "block_importance",
                 contiguous: bool = False) -> PrunePlan:
    """Decide what to keep (see :func:`prune_model` for the arguments)."""
    check_supported(teacher)
    cfg = teacher.config
    L, D, F = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    hd = teacher.model.layers[0].self_attn.head_dim
    n_layers = check_target("layers", layers, L)
    n_hidden = check_target("hidden", hidden, D)
    n_ffn = check_target("ffn", ffn, F)
    n_heads = check_target("heads", heads, H)
    n_kv = kv_group_count(n_heads, H, KV, kv_heads) if (n_heads < H or kv_heads is not None) else KV
    if method not in ("block_importance", "loss"):
        raise DistilleryError(f"prune: method '{method}' is not one of block_importance, loss")

    sized_config(cfg, list(range(n_layers)), hidden=n_hidden, ffn=n_ffn, heads=n_heads, kv_heads=n_kv,
                 head_dim=hd)  # refuse what transformers would not save or load, before calibrating
    width = n_hidden < D or n_ffn < F or n_heads < H or n_kv < KV
    depth = n_layers < L
    full = PrunePlan(layers=list(range(L)), channels=torch.arange(D), q_heads=[torch.arange(H)] * L,
                     kv_heads=[torch.arange(KV)] * L, neurons=[torch.arange(F)] * L, head_dim=hd)
    if not (width or depth):
        return full  # nothing to remove: no calibration needed, the slicing reproduces the teacher
    batches = list(calib_batches)
    if not batches:
        raise DistilleryError("prune: calibration data is empty (pruning needs activations to rank parts)")

    span = (L - n_layers) if contiguous else 1
    calib: Calibration = calibrate(teacher, batches, span=span if (depth and method == "block_importance") else None)
    scores: dict = {"calibration_tokens": calib.tokens, "method": method, "contiguous": contiguous}
    kept_layers = full.layers
    if depth:
        depth_scores = calib.block_importance if method == "block_importance" else loss_importance(teacher, batches, span)
        kept_layers = choose_layers(depth_scores, L, n_layers, contiguous)
        scores["depth_scores"] = depth_scores
    channel_scores = calib.layer_channels[kept_layers].sum(dim=0) + calib.final_channels  # (D,)
    q_heads, kv_groups, neurons = [], [], []
    for i in kept_layers:
        if n_heads < H or n_kv < KV:
            q, g = choose_heads(calib.heads[i], KV, n_heads, n_kv)
        else:
            q, g = torch.arange(H), torch.arange(KV)
        q_heads.append(q)
        kv_groups.append(g)
        neurons.append(top_k(calib.neurons[i], n_ffn))
    return PrunePlan(layers=kept_layers, channels=top_k(channel_scores, n_hidden), q_heads=q_heads,
                     kv_heads=kv_groups, neurons=neurons, head_dim=hd, scores=scores)


def prune_model(teacher, calib_batches: Iterable[dict], *, layers: int | None = None, hidden: int | None = None,
                ffn: int | None = None, heads: int | None = None, kv_heads: int | None = None,
                method: Literal["block_importance", "loss"] = "block_importance", contiguous: bool = False):
    """A student pruned from ``teacher`` (a ``PreTrainedModel`` of a family in ``SUPPORTED``), weights inherited.

    Args:
        calib_batches: batches with ``input_ids (B, T)`` and ``attention_mask (B, T)`` (``labels``
            optional, used by ``method='loss'``); needed unless nothing is removed.
        layers / hidden / ffn / heads: target decoder layers, hidden size, MLP width and query heads
            (None = the teacher's). ``heads`` keeps whole KV groups: see :mod:`distillery.prune.plan`.
        kv_heads: target KV heads (default: as many of the teacher's groups as ``heads`` allows).
        method: depth ranking by block importance (1 − cos(block input, output), one pass) or by the
            calibration loss with each candidate block removed (one pass per candidate).
        contiguous: drop one contiguous block of layers instead of the individually least important.

    Returns a new model of the teacher's class, dtype and device, in eval mode; the teacher is unchanged.
    """
    plan = plan_pruning(teacher, calib_batches, layers=layers, hidden=hidden, ffn=ffn, heads=heads,
                        kv_heads=kv_heads, method=method, contiguous=contiguous)
    student = apply_plan(teacher, plan)
    student.prune_plan = plan.summary()  # what was kept and why (prune_main writes it next to the weights)
    return student



__all__ = ["PrunePlan", "apply_plan", "calibrate", "calibration_loss", "check_supported",
           "loss_importance", "plan_pruning", "prune_model"]
