"""``student.lora``: distill into a LoRA adapter on a student that already has weights (peft).

The adapter goes *into* the Hugging Face model (``peft.inject_adapter_in_model``): the student stays a
``LlamaForCausalLM`` (or any family), its targeted linears become ``lora.Linear`` computing

    y = W x (+ b) + (alpha / r) · B A dropout(x),    A (r, in) random, B (out, r) = 0 at the start,

so step 0 is the pretrained student exactly, and the loop, the fused loss, checkpoints and resume need
nothing new: only A and B have ``requires_grad`` (``make_optimizer`` takes only those), checkpoints hold
the whole state dict (base weights + adapter) and a resumed run rebuilds the same adapter before loading.

On save the student is merged (:func:`plain_model`: ``W ← W + (alpha / r) B A`` in a copy, adapter layers
replaced by plain ``nn.Linear``), so the student folder is a plain model every exporter reads; the adapter
alone is written by :func:`save_adapter` in peft's format (``PeftModel.from_pretrained(base, folder)``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from .errors import DistilleryError

ADAPTER = "default"  # peft's adapter name


def _peft():
    try:
        import peft
    except ImportError:
        raise DistilleryError("student.lora needs peft: pip install 'distillery[lora]'") from None
    return peft


def peft_config(lcfg):
    """The ``peft.LoraConfig`` of a ``config.LoraConfig`` section."""
    target = lcfg.target_modules if isinstance(lcfg.target_modules, str) else list(lcfg.target_modules)
    return _peft().LoraConfig(r=lcfg.rank, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout, target_modules=target,
                              bias="none", task_type="CAUSAL_LM")


def add_lora(model: torch.nn.Module, lcfg) -> torch.nn.Module:
    """Put an adapter into ``model`` (in place) and freeze everything else; return ``model``."""
    peft = _peft()
    try:
        peft.inject_adapter_in_model(peft_config(lcfg), model, adapter_name=ADAPTER)
    except ValueError as exc:  # e.g. target modules not found in the model
        raise DistilleryError(f"student.lora: {exc}".splitlines()[0]) from None
    head = [n for n, _ in _tuner_layers(model) if n.rsplit(".", 1)[-1] in ("lm_head", "embed_tokens")]
    if head:  # the fused loss reads the head's weight as a plain tensor, and a tied table has one owner
        raise DistilleryError(f"student.lora: an adapter on {head[0]} is not supported (the loss reads the LM head's "
                              "weight directly); target the decoder layers' linears")
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    if not any(p.requires_grad for p in model.parameters()):
        raise DistilleryError("student.lora: no layer of the student got an adapter (check student.lora.target_modules)")
    return model


def _tuner_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def has_lora(model: torch.nn.Module) -> bool:
    try:
        return bool(_tuner_layers(model))
    except ImportError:  # peft not installed: no adapter can be there
        return False


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def plain_model(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` itself when it has no adapter; else a merged copy (``W + (alpha/r) B A``, plain linears)."""
    layers = _tuner_layers(model) if has_lora(model) else []
    if not layers:
        return model
    merged = copy.deepcopy(model)
    for name, layer in _tuner_layers(merged):
        layer.merge(adapter_names=[ADAPTER])
        parent_name, _, child = name.rpartition(".")
        parent = merged.get_submodule(parent_name) if parent_name else merged
        setattr(parent, child, layer.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):  # peft's marks on the instance: a plain model now
        if attr in merged.__dict__:
            delattr(merged, attr)
    merged.requires_grad_(True)
    return merged


def save_adapter(model: torch.nn.Module, lcfg, folder: str | Path, base: str | None) -> Path:
    """The adapter alone, as peft writes it: ``adapter_model.safetensors`` + ``adapter_config.json``."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    save_file({f"base_model.model.{k}": v.detach().contiguous().cpu() for k, v in state.items()},
              str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = peft_config(lcfg)
    cfg.base_model_name_or_path = base
    cfg.save_pretrained(str(folder))
    meta = {"trainable_parameters": trainable_parameters(model), "rank": lcfg.rank, "alpha": lcfg.alpha}
    (folder / "distillery_adapter.json").write_text(json.dumps(meta, indent=2))
    return folder
