"""Apply a :class:`PrunePlan`: slice the teacher's weights into a fresh model of the same family.

Shapes (teacher → student), ``d`` = head_dim (kept), ``c`` = kept channels, ``q`` = rows of the kept
query heads (``h·d .. h·d + d - 1`` for each kept head ``h``), ``kv`` = rows of the kept KV heads,
``f`` = kept neurons:

    embed_tokens (V, D)      -> [:, c]          lm_head (V, D) -> [:, c]      RMSNorm (D,) -> [c]
    q_proj (H·d, D) + bias   -> [q][:, c]       k_proj, v_proj (KV·d, D) + bias -> [kv][:, c]
    o_proj (D, H·d) + bias   -> [c][:, q]       gate/up (F, D) + bias -> [f][:, c]
    down (D, F) + bias       -> [c][:, f]

Phi-3's fused ``qkv_proj`` (rows ``[q | k | v]``) and ``gate_up_proj`` (rows ``[gate | up]``) take the same
rows, each block offset by the teacher's width of the blocks before it. Qwen3 / Gemma 3 q/k norms ``(d,)``
are kept whole (``d`` is kept); Gemma 2/3's extra norms slice like the other RMSNorms. Gemma multiplies the
embedding by √D inside the model: a width-pruned Gemma's inputs are scaled by √c instead (training adapts).

The config keeps ``head_dim`` explicitly (it no longer equals hidden / heads once either changes)
and, for Qwen2, the ``layer_types`` of the kept layers. Tied embeddings stay tied (one table).
"""

from __future__ import annotations

import contextlib
import copy
import re

import torch

from ..errors import DistilleryError
from .plan import PrunePlan

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _no_init():
    """Skip random initialisation of the fresh model (every weight is overwritten)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Weight rows of ``heads`` ((n,) head indices) -> (n · head_dim,)."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def _slice(t: torch.Tensor, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> torch.Tensor:
    if rows is not None:
        t = t.index_select(0, rows.to(t.device))
    if cols is not None:
        t = t.index_select(1, cols.to(t.device))
    return t.clone()


def pruned_config(config, plan: PrunePlan):
    """A copy of the teacher's HF config with the pruned sizes (head_dim explicit, layer_types subset)."""
    return sized_config(config, plan.layers, hidden=int(plan.channels.numel()), ffn=int(plan.neurons[0].numel()),
                        heads=int(plan.q_heads[0].numel()), kv_heads=int(plan.kv_heads[0].numel()),
                        head_dim=plan.head_dim)


def sized_config(config, layers: list[int], *, hidden: int, ffn: int, heads: int, kv_heads: int, head_dim: int):
    """The teacher's config with new sizes, checked by the config class's own validation.

    transformers validates configs when saving and loading (e.g. ``LlamaConfig`` demands
    ``hidden_size % num_attention_heads == 0`` even with an explicit ``head_dim``); a target it would
    reject is refused here, before any calibration, with the rule in the message.
    """
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = len(layers)
    cfg.hidden_size, cfg.intermediate_size = hidden, ffn
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = heads, kv_heads, head_dim
    types = getattr(config, "layer_types", None)
    if types is not None:
        cfg.layer_types = [types[i] for i in layers]
    if getattr(config, "max_window_layers", None) is not None:  # Qwen2: sliding from this layer on
        cfg.max_window_layers = sum(1 for i in layers if i < config.max_window_layers)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        try:
            validate()
        except Exception as exc:  # huggingface_hub's StrictDataclassClassValidationError wraps the reason
            reason = str(getattr(exc, "__cause__", None) or exc).strip().splitlines()[-1].strip()
            raise DistilleryError(f"prune: transformers rejects the pruned {config.model_type} config "
                                  f"(hidden={hidden}, heads={heads}, kv_heads={kv_heads}, ffn={ffn}): {reason}") from None
    return cfg


def _fused_rows(cfg, q: torch.Tensor, kv: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of Phi-3's ``qkv_proj`` ``[q (H·d) | k (KV·d) | v (KV·d)]`` and ``gate_up_proj`` ``[gate (F) | up (F)]``."""
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    nq, nkv = cfg.num_attention_heads * hd, (cfg.num_key_value_heads or cfg.num_attention_heads) * hd
    return torch.cat([q, nq + kv, nq + nkv + kv]), torch.cat([f, cfg.intermediate_size + f])


def _layer_param(name: str, t: torch.Tensor, plan: PrunePlan, j: int, cfg=None) -> torch.Tensor:
    """Slice parameter ``name`` (relative to its layer) of kept layer ``j`` (``cfg``: the teacher's config)."""
    c, f = plan.channels, plan.neurons[j]
    q, kv = _rows(plan.q_heads[j], plan.head_dim), _rows(plan.kv_heads[j], plan.head_dim)
    qkv, gate_up = _fused_rows(cfg, q, kv, f) if cfg is not None else (None, None)
    rules = {
        "self_attn.qkv_proj.weight": (qkv, c), "mlp.gate_up_proj.weight": (gate_up, c),  # Phi-3 (fused)
        "self_attn.q_norm.weight": (None, None), "self_attn.k_norm.weight": (None, None),  # per head_dim
        "pre_feedforward_layernorm.weight": (c, None), "post_feedforward_layernorm.weight": (c, None),
        "self_attn.q_proj.weight": (q, c), "self_attn.q_proj.bias": (q, None),
        "self_attn.k_proj.weight": (kv, c), "self_attn.k_proj.bias": (kv, None),
        "self_attn.v_proj.weight": (kv, c), "self_attn.v_proj.bias": (kv, None),
        "self_attn.o_proj.weight": (c, q), "self_attn.o_proj.bias": (c, None),
        "mlp.gate_proj.weight": (f, c), "mlp.gate_proj.bias": (f, None),
        "mlp.up_proj.weight": (f, c), "mlp.up_proj.bias": (f, None),
        "mlp.down_proj.weight": (c, f), "mlp.down_proj.bias": (c, None),
        "input_layernorm.weight": (c, None), "post_attention_layernorm.weight": (c, None),
    }
    if name not in rules:
        raise DistilleryError(f"prune: the teacher has a layer parameter '{name}' that pruning does not know how to slice")
    return _slice(t, *rules[name])


def pruned_state_dict(model, plan: PrunePlan) -> dict[str, torch.Tensor]:
    """The student's weights (new layer numbering), sliced from ``model``'s state dict."""
    new_index = {old: new for new, old in enumerate(plan.layers)}
    c = plan.channels
    out = {}
    for key, t in model.state_dict().items():
        m = _LAYER_KEY.match(key)
        if m:
            old = int(m.group(1))
            if old in new_index:
                j = new_index[old]
                out[f"model.layers.{j}.{m.group(2)}"] = _layer_param(m.group(2), t, plan, j, model.config)
        elif key in ("model.embed_tokens.weight", "lm_head.weight"):
            out[key] = _slice(t, cols=c)
        elif key == "model.norm.weight":
            out[key] = _slice(t, rows=c)
        elif key == "lm_head.bias":
            out[key] = t.clone()
        else:
            raise DistilleryError(f"prune: the teacher has a parameter '{key}' that pruning does not know how to slice")
    return out


@torch.no_grad()
def apply_plan(model, plan: PrunePlan):
    """A fresh model of ``type(model)`` holding the kept weights (teacher's dtype and device, eval mode)."""
    ref = next(model.parameters())
    cfg = pruned_config(model.config, plan)
    with _no_init():
        student = type(model)(cfg)
    student.to(device=ref.device, dtype=ref.dtype)
    weights = pruned_state_dict(model, plan)
    expected = student.state_dict()
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise DistilleryError(f"prune: no teacher weights for {missing[:3]}")
    for key, t in weights.items():
        if key not in expected:  # e.g. a tied lm_head a model does not list separately
            continue
        if expected[key].shape != t.shape:
            raise DistilleryError(f"prune: {key} has shape {tuple(t.shape)}, the pruned config expects {tuple(expected[key].shape)}")
    student.load_state_dict({k: v for k, v in weights.items() if k in expected}, strict=True)
    if getattr(cfg, "tie_word_embeddings", False):
        student.tie_weights()
    student.generation_config = copy.deepcopy(model.generation_config)
    return student.eval()
