"""Importance scores measured on calibration data (Minitron, Muralidharan et al., 2024).

One calibration pass with forward hooks yields every activation-based score. Each score is a
per-sample mean over the real tokens (``attention_mask == 1``) and then an L2 norm over samples
(Minitron's best "(batch: L2, sequence: mean)" aggregation):

* head ``h`` of layer ``l``: ‖o_h‖₂ over ``head_dim``, where ``o_h`` is the attention output of the
  head (the input of ``o_proj``, columns ``h·d .. (h+1)·d``);
* MLP neuron ``j``: |act(gate_j(x)) · up_j(x)| (the input of ``down_proj``);
* embedding channel ``c``: |RMSNorm(x)_c| at every RMSNorm (both per layer, and the final one),
  summed over the norms of the layers that are kept. The norm *outputs* are what every projection
  reads, so a channel that they scale down is cheap to drop; this is Minitron's ``LN(X)`` choice.

Depth scores, per candidate block of ``span`` consecutive layers starting at ``i``:

* block importance (ShortGPT, Men et al., 2024): BI = 1 − cos(x_i, x_{i+span}) averaged over real
  tokens, where ``x_i`` is the residual stream entering layer ``i``. A block that barely changes
  its input has BI ≈ 0 and goes first.
* loss: mean next-token cross-entropy on the calibration data with the block removed, minus the
  full model's. The block whose removal hurts least goes first.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..errors import DistilleryError


@dataclass
class Calibration:
    """Scores from one pass. ``L`` layers, ``H`` query heads, ``F`` MLP neurons, ``D`` hidden channels."""

    heads: torch.Tensor          # (L, H)
    neurons: torch.Tensor        # (L, F)
    layer_channels: torch.Tensor  # (L, D): summed over the two RMSNorms of each layer
    final_channels: torch.Tensor  # (D,): the final RMSNorm
    block_importance: torch.Tensor | None  # (L - span + 1,): BI of each block of ``span`` layers
    tokens: int


def batch_mask(batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids (B, T), attention_mask (B, T)) on ``device``; a missing mask means all tokens are real."""
    ids = batch["input_ids"].to(device)
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.to(device)
    return ids, mask


def _per_sample_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Mean of ``x (B, T, K)`` over the real tokens of each row (``m (B, T)`` float) -> ``(B, K)``."""
    return (x * m[..., None]).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)[:, None]


def _first_tensor(x):
    return x[0] if isinstance(x, (tuple, list)) else x


@torch.no_grad()
def calibrate(model, batches: list[dict], span: int | None = None) -> Calibration:
    """Run ``model`` over ``batches`` once and collect every activation score (see module docstring).

    ``span``: also compute block importance for blocks of ``span`` consecutive layers (None = skip).
    """
    core = model.model
    layers = list(core.layers)
    L = len(layers)
    attn0 = layers[0].self_attn
    H, hd = model.config.num_attention_heads, attn0.head_dim
    dev = next(model.parameters()).device
    F = layers[0].mlp.down_proj.in_features
    D = model.config.hidden_size
    sq = {"heads": torch.zeros(L, H, device=dev), "neurons": torch.zeros(L, F, device=dev),
          "layer_channels": torch.zeros(L, 2, D, device=dev), "final": torch.zeros(D, device=dev)}
    n_blocks = L - span + 1 if span else 0
    bi_sum = torch.zeros(max(n_blocks, 0), device=dev, dtype=torch.float64)
    state: dict = {}
    handles = []

    def acc(key, idx):
        def add(value):  # value (B, T, K) >= 0 -> accumulate Σ_b (per-sample mean)²
            mean = _per_sample_mean(value.float(), state["m"])
            if idx is None:
                sq[key] += (mean ** 2).sum(dim=0)
            else:
                sq[key][idx] += (mean ** 2).sum(dim=0)
        return add

    for i, layer in enumerate(layers):
        add_h, add_n = acc("heads", i), acc("neurons", i)
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(
            lambda mod, args, add=add_h: add(args[0].unflatten(-1, (H, hd)).float().norm(dim=-1))))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(
            lambda mod, args, add=add_n: add(args[0].abs())))
        # the norm outputs the attention and the MLP read (Gemma 2/3: the MLP reads pre_feedforward_layernorm)
        mlp_norm = getattr(layer, "pre_feedforward_layernorm", None) or layer.post_attention_layernorm
        for j, norm in enumerate((layer.input_layernorm, mlp_norm)):
            add_c = acc("layer_channels", (i, j))
            handles.append(norm.register_forward_hook(lambda mod, args, out, add=add_c: add(_first_tensor(out).abs())))
        if span:
            def keep_in(mod, args, kwargs, i=i):
                if i == 0:
                    state["x"][0] = _first_tensor(args[0] if args else kwargs["hidden_states"]).float()
            handles.append(layer.register_forward_pre_hook(keep_in, with_kwargs=True))
            handles.append(layer.register_forward_hook(
                lambda mod, args, out, i=i: state["x"].__setitem__(i + 1, _first_tensor(out).float())))
    add_f = acc("final", None)
    handles.append(core.norm.register_forward_hook(lambda mod, args, out: add_f(_first_tensor(out).abs())))

    was_training, tokens = model.training, 0
    model.eval()
    try:
        for batch in batches:
            ids, mask = batch_mask(batch, dev)
            m = mask.float()
            state["m"], state["x"] = m, [None] * (L + 1)
            core(input_ids=ids, attention_mask=mask, use_cache=False)
            tokens += int(m.sum())
            xs = state["x"]
            for s in range(n_blocks):  # BI of block [s, s + span): 1 - cos(x_s, x_{s+span}) per real token
                cos = torch.nn.functional.cosine_similarity(xs[s], xs[s + span], dim=-1)  # (B, T)
                bi_sum[s] += ((1.0 - cos.double()) * m).sum()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if tokens == 0:
        raise DistilleryError("pruning calibration data holds no tokens")
    return Calibration(heads=sq["heads"].sqrt().cpu(), neurons=sq["neurons"].sqrt().cpu(),
                       layer_channels=sq["layer_channels"].sqrt().sum(dim=1).cpu(), final_channels=sq["final"].sqrt().cpu(),
                       block_importance=(bi_sum / tokens).float().cpu() if span else None, tokens=tokens)


@contextlib.contextmanager
def layers_removed(model, drop: set[int]):
    """Temporarily run ``model`` without the layers in ``drop`` (and the matching ``layer_types``)."""
    core, cfg = model.model, model.config
    old_layers, old_n = core.layers, cfg.num_hidden_layers
    old_types = getattr(cfg, "layer_types", None)
    keep = [i for i in range(len(old_layers)) if i not in drop]
    core.layers = torch.nn.ModuleList([old_layers[i] for i in keep])
    cfg.num_hidden_layers = len(keep)
    if old_types is not None:
        cfg.layer_types = [old_types[i] for i in keep]
    try:
        yield
    finally:
        core.layers, cfg.num_hidden_layers = old_layers, old_n
        if old_types is not None:
            cfg.layer_types = old_types


def _targets(batch: dict, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Shifted labels (B, T): the batch's own, or the next real token."""
    if "labels" in batch:
        return batch["labels"].to(ids.device)
    nxt = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
    ok = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1) * mask
    return nxt.masked_fill(ok == 0, -100)


@torch.no_grad()
def calibration_loss(model, batches: list[dict], chunk_rows: int = 1024) -> float:
    """Mean next-token cross-entropy over the target positions; the LM head runs on chunks of rows."""
    dev = next(model.parameters()).device
    head = model.get_output_embeddings()
    total, count = 0.0, 0
    for batch in batches:
        ids, mask = batch_mask(batch, dev)
        labels = _targets(batch, ids, mask).reshape(-1)  # (B*T,)
        h = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        h = h.reshape(-1, h.shape[-1])  # (B*T, D)
        rows = (labels != -100).nonzero().squeeze(1)
        for start in range(0, rows.numel(), chunk_rows):
            r = rows[start:start + chunk_rows]
            logits = torch.nn.functional.linear(h[r], head.weight, head.bias).float()  # (n, V)
            total += torch.nn.functional.cross_entropy(logits, labels[r], reduction="sum").item()
        count += rows.numel()
    if count == 0:
        raise DistilleryError("pruning calibration data holds no target tokens")
    return total / count


@torch.no_grad()
def loss_importance(model, batches: list[dict], span: int) -> torch.Tensor:
    """``(L - span + 1,)``: calibration loss with layers ``[s, s + span)`` removed, minus the full model's."""
    was_training = model.training
    model.eval()
    try:
        base = calibration_loss(model, batches)
        L = len(model.model.layers)
        scores = []
        for s in range(L - span + 1):
            with layers_removed(model, set(range(s, s + span))):
                scores.append(calibration_loss(model, batches) - base)
    finally:
        model.train(was_training)
    return torch.tensor(scores)
