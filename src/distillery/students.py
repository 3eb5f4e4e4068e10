"""Students: plain Hugging Face causal LMs, built from a config, loaded pretrained, or pruned from the teacher.

A student is always a ``PreTrainedModel`` of a family every runtime converter knows
(``SUPPORTED_FAMILIES``: Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 text, Phi-3), saved with
``save_pretrained`` (safetensors) plus the tokenizer, so ``AutoModelForCausalLM.from_pretrained(folder)``
loads it without distillery. The family is checked before anything loads (:func:`check_student_family`).

The training loss computes the student's logits as ``hidden @ W_headᵀ (+ b)`` chunk by chunk
(``losses.chunked``), which is what every family above does except Gemma 2 with its final logit
soft-cap ``c·tanh(z/c)``: such a student is refused in one line; a Gemma 2 student built from
``student.model`` gets ``final_logit_softcapping: null`` unless the recipe sets it (then it is refused).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .config import STUDENT_FAMILIES, StudentConfig
from .errors import DistilleryError

SUPPORTED_FAMILIES = STUDENT_FAMILIES  # one list: config.STUDENT_FAMILIES (checked when the recipe loads)

# Fields copied from the teacher's config when the student's model section does not set them: the
# vocabulary and special tokens must match; the rest are architecture choices, copied only when the
# student is of the teacher's own family (a Gemma student keeps Gemma's GELU and RoPE layout under a
# Llama teacher).
_INHERITED = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings",
              "tie_word_embeddings")
_SAME_FAMILY = ("rope_theta", "rope_scaling", "rope_parameters", "rms_norm_eps", "hidden_act", "attention_bias",
                "mlp_bias")


def check_family(config, where: str) -> None:
    """One line unless ``config`` (a HF config or a config.json dict) is a student family the loss computes
    exactly: a supported ``model_type`` and no final logit soft-capping."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    mt = get("model_type")
    if mt not in SUPPORTED_FAMILIES:
        raise DistilleryError(f"{where}: student family '{mt}' is not supported (choose one of {', '.join(SUPPORTED_FAMILIES)})")
    cap = get("final_logit_softcapping")
    if cap is not None:
        raise DistilleryError(f"{where}: {mt} with final_logit_softcapping={cap} is not supported as a student (the fused "
                              "loss computes logits as hidden @ W^T); set final_logit_softcapping: null")


def check_student_family(cfg: StudentConfig) -> None:
    """The student's family, read from the recipe or ``student.pretrained``'s config.json (no weights):
    called before the teacher loads."""
    if cfg.init == "pretrained" and cfg.pretrained:
        path = Path(cfg.pretrained).expanduser() / "config.json"
        if path.is_file():
            try:
                check_family(json.loads(path.read_text()), f"student.pretrained '{cfg.pretrained}'")
            except (OSError, json.JSONDecodeError) as exc:
                raise DistilleryError(f"{path}: unreadable ({exc})".splitlines()[0]) from None
    elif cfg.init == "config" and "model_type" in cfg.model:
        check_family({"final_logit_softcapping": None, **cfg.model}, "student.model")


def student_config(model_fields: dict, teacher_config) -> "AutoConfig":
    """HF config for a fresh student: the recipe's ``student.model`` fields over the teacher's basics."""
    fields = dict(model_fields)
    model_type = fields.pop("model_type", getattr(teacher_config, "model_type", "llama"))
    if model_type not in SUPPORTED_FAMILIES:
        raise DistilleryError(f"student.model.model_type '{model_type}' is not supported "
                              f"(choose one of {', '.join(SUPPORTED_FAMILIES)})")
    base = {}
    if teacher_config is not None:
        tdict = teacher_config.to_dict()
        keys = _INHERITED + (_SAME_FAMILY if tdict.get("model_type") == model_type else ())
        base = {k: tdict[k] for k in keys if k in tdict and tdict[k] is not None}
    base.update(fields)
    if "hidden_size" in base and "num_attention_heads" in base and "head_dim" not in fields:
        base["head_dim"] = base["hidden_size"] // base["num_attention_heads"]
    if model_type in ("gemma", "gemma2") and "tie_word_embeddings" not in fields:
        base["tie_word_embeddings"] = True  # Gemma 1/2 read their logits off the embedding (llama.cpp requires it)
    if model_type in ("gemma2", "gemma3_text"):
        # Gemma 2/3 scale attention by query_pre_attn_scalar^-1/2 (Gemma's own sizes: = head_dim); keep that
        # relation for a resized student (llama.cpp assumes it), and no final soft-cap unless asked (then refused)
        base.setdefault("final_logit_softcapping", None)
        if "head_dim" in base:
            base.setdefault("query_pre_attn_scalar", base["head_dim"])
    try:
        cfg = AutoConfig.for_model(model_type, **base)
    except (TypeError, ValueError) as exc:
        raise DistilleryError(f"student.model: invalid config ({exc})".splitlines()[0]) from None
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    if heads % kv:
        raise DistilleryError(f"student.model: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv})")
    return cfg


def build_student(cfg: StudentConfig, teacher_model: PreTrainedModel | None = None,
                  calibration: Iterable[dict] | None = None, seed: int = 0,
                  student_tokenizer: PreTrainedTokenizerBase | None = None,
                  teacher_tokenizer: PreTrainedTokenizerBase | None = None) -> PreTrainedModel:
    """Make the student named by ``cfg`` (fp32, train mode).

    ``student_tokenizer`` (with ``teacher_tokenizer``; only for a cross-tokenizer run): a pruned student then gets
    that tokenizer's vocabulary by embedding transplant (:func:`~distillery.xtok.transplant.transplant_vocabulary`).
    """
    check_student_family(cfg)
    if cfg.init == "pretrained":
        if not cfg.pretrained:
            raise DistilleryError("student.init is 'pretrained' but student.pretrained (a folder) is not set")
        path = Path(cfg.pretrained)
        if not (path / "config.json").is_file():
            raise DistilleryError(f"student.pretrained '{path}' is not a model folder (no config.json)")
        try:  # custom model code is never run for a student (trust_remote_code stays off)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        except (OSError, ValueError) as exc:
            from .teachers.hf import remote_code_error

            raise remote_code_error(exc, f"student.pretrained '{path}'", "a student's trust_remote_code (not supported)") from None
    elif cfg.init == "pruned":
        if teacher_model is None:
            raise DistilleryError("student.init 'pruned' needs a live teacher (teacher.kind: hf)")
        from .prune import prune_model  # pruning lives in its own part

        p = cfg.prune
        model = prune_model(teacher_model, list(calibration or []), layers=p.layers, hidden=p.hidden,
                            ffn=p.ffn, heads=p.heads, method=p.method)
        model = model.to(torch.float32)
        if student_tokenizer is not None:  # its own tokenizer: rows rebuilt from the teacher's (xtok.transplant)
            if teacher_tokenizer is None:
                raise DistilleryError("build_student: student_tokenizer needs teacher_tokenizer (the vocabulary it replaces)")
            from .xtok.transplant import transplant_vocabulary

            model = transplant_vocabulary(model, teacher_tokenizer, student_tokenizer)
    else:
        config = student_config(cfg.model, None if teacher_model is None else teacher_model.config)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    check_family(model.config, "student")
    model.requires_grad_(True)
    if cfg.lora is not None:  # only the adapter trains; saved merged (lora.plain_model)
        from .lora import add_lora

        torch.manual_seed(seed)  # A's random init: the same adapter in every run of the recipe (and on resume)
        add_lora(model, cfg.lora)
    return model.train()


def load_student_tokenizer(cfg: StudentConfig, teacher_tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A pretrained student brings its own tokenizer; built and pruned students share the teacher's."""
    if cfg.init == "pretrained" and cfg.pretrained and (Path(cfg.pretrained) / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(cfg.pretrained)
    return teacher_tokenizer


def check_vocab(teacher_tok: PreTrainedTokenizerBase, student_tok: PreTrainedTokenizerBase,
                teacher_width: int | None = None, student_width: int | None = None) -> int:
    """Check the two tokenizers agree and both embedding tables cover them; return the shared vocab size.

    Compares the token → id maps (not only sizes): a student with another tokenizer must never be
    fed the teacher's ids. Embedding tables may be padded past the tokenizer (151,936 vs 152,064 in
    Qwen2 checkpoints): the loss then uses the first ``len(tokenizer)`` columns of both.
    """
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv != sv:
        only_t = sorted(set(tv) - set(sv))
        moved = sorted(k for k in set(tv) & set(sv) if tv[k] != sv[k])
        example = (only_t or moved or sorted(set(sv) - set(tv)))[:3]
        raise DistilleryError(
            f"tokenizer mismatch: teacher has {len(tv)} tokens, student {len(sv)}; {len(only_t)} teacher tokens "
            f"missing from the student and {len(moved)} with other ids (e.g. {example}); "
            "same-tokenizer distillation needs identical vocabularies")
    from .teachers.protocol import shared_vocab  # the one vocabulary rule

    return shared_vocab(teacher_tok, teacher_width, student_width)


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


def sparse_tied_embedding_grad(model: torch.nn.Module) -> bool:
    """Have a tied input embedding pass its gradient as a sparse tensor (only the rows the batch looked up) into
    the table's gradient; True when the model's embedding is tied to its LM head and now does so.

    Why: the table gets two gradients per backward, the head's (dense, ``(V, H)``) and the lookup's. A dense lookup
    gradient is a second fp32 ``(V, H)`` tensor (77 MB at 50k x 384), zero except for the batch's rows, alive beside
    the head's at the end of backward, the step's memory peak on the cross-tokenizer pair
    (``benchmarks/xtok_memory.py run``). Sparse, it is ``(tokens, H)`` and is added into the head's dense gradient
    by autograd, so the parameter's ``.grad`` stays dense for the optimizer and clipping. Untied tables keep dense
    gradients (a sparse ``.grad`` would reach the optimizer); a step whose loss never reads the head still gets a
    dense ``.grad`` (the hook below)."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(emb, torch.nn.Embedding) or head is None or head.weight is not emb.weight:
        return False
    if not emb.weight.requires_grad:  # a frozen table (LoRA, a user's freeze) has no gradient to shrink
        return False
    emb.sparse = True

    def densify(p: torch.Tensor) -> None:
        if p.grad is not None and p.grad.is_sparse:
            p.grad = p.grad.to_dense()
    emb.weight.register_post_accumulate_grad_hook(densify)
    return True
