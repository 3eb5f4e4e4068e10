"""Batched KV-cached sampling from a Hugging Face causal LM, for on-policy distillation.

``sample`` runs one prefill over the left-padded prompts, then one model call per new token on the
``(B, 1)`` last tokens with the KV cache. Per step the only work besides the model call is a handful
of tensor ops (temperature, nucleus filter, draw, EOS bookkeeping); the attention mask and the output
buffer are allocated once. Positions follow the left padding (``position = cumsum(mask) - 1``), as
``model.generate`` does, so greedy ``sample`` matches greedy ``generate`` token for token.

``sample_temperature == 0`` is greedy (argmax) and ignores ``top_p`` and the generator.
"""

from __future__ import annotations

import functools
import inspect

import torch

from .errors import DistilleryError


@functools.lru_cache(maxsize=32)
def _forward_args(model_cls: type) -> tuple[str, bool]:
    """(name of the KV-cache argument, accepts ``logits_to_keep``) for a model class's forward.

    The cache argument is ``cache`` in recent transformers and ``past_key_values`` before.
    """
    params = inspect.signature(model_cls.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


def _returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _device_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """A generator on ``device``; a CPU generator for a CUDA model seeds a CUDA one from its own stream.

    Drawing the seed advances ``generator``, so a run that restores its state (resume) samples the same.
    """
    if generator is None or generator.device.type == device.type:
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def next_tokens(logits: torch.Tensor, sample_temperature: float, top_p: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Choose one token per row from ``logits (B, V)``; returns ``(B,)`` int64.

    Greedy when ``sample_temperature == 0``; otherwise draws from softmax(logits / sample_temperature)
    restricted to the smallest set of tokens whose probability reaches ``top_p`` (nucleus sampling;
    the most likely token is always kept).
    """
    if sample_temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / sample_temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p  # mass before this token already reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _eos_tensor(eos_token_id, device) -> torch.Tensor | None:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None


def completion_mask_from(generated: torch.Tensor, eos: torch.Tensor | None) -> torch.Tensor:
    """``(B, N)`` 1 on generated tokens up to and including each row's first EOS, 0 after it."""
    if eos is None:
        return torch.ones_like(generated)
    is_eos = torch.isin(generated, eos).long()  # (B, N)
    eos_before = is_eos.cumsum(dim=1) - is_eos   # EOS tokens strictly before t
    return (eos_before == 0).long()


@torch.no_grad()
def sample(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
           sample_temperature: float = 1.0, top_p: float = 1.0, eos_token_id: int | list[int] | None = None,
           pad_token_id: int = 0, generator: torch.Generator | None = None,
           vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Continue left-padded prompts with ``model``; returns ``(sequences, completion_mask)``.

    Args:
        input_ids: ``(B, P)`` prompts, **left**-padded (every row ends at column ``P - 1``).
        attention_mask: ``(B, P)`` 1 on real prompt tokens, 0 on the left padding.
        max_new_tokens: at most ``N`` new tokens; generation stops earlier once every row has
            produced an EOS.
        sample_temperature: 0 = greedy; else the softmax temperature of the draw.
        top_p: nucleus mass (1 = the whole distribution).
        eos_token_id: one id or a list; ``None`` = never stop early.
        pad_token_id: written after a row's EOS.
        generator: RNG of the draws (a CPU generator works for a CUDA model: it seeds one there).
        vocab_size: sample only among the first ``vocab_size`` logits (padded embedding tables).

    Returns:
        sequences ``(B, P + N')`` int64 (``N' ≤ N`` steps run): prompt, then the generated tokens,
        then ``pad_token_id`` after each row's first EOS;
        completion_mask ``(B, P + N')`` int64: 1 on generated tokens up to and including the first
        EOS, 0 on the prompt, the prompt padding and everything after the EOS.

    The model runs in eval mode for the call (its previous mode is restored).
    """
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise DistilleryError(f"sample: input_ids {tuple(input_ids.shape)} and attention_mask "
                              f"{tuple(attention_mask.shape)} must both be (B, P)")
    if max_new_tokens <= 0:
        raise DistilleryError(f"sample: max_new_tokens must be positive (got {max_new_tokens})")
    if bool((attention_mask[:, -1] == 0).any()):
        raise DistilleryError("sample: prompts must be left-padded (attention_mask[:, -1] must be 1 in every row)")
    device = input_ids.device
    B, P = input_ids.shape
    eos = _eos_tensor(eos_token_id, device)
    gen = _device_generator(generator, device)
    cache_arg, keep_arg = _forward_args(type(model))
    was_training = model.training
    model.eval()

    # Buffers allocated once: the mask grows by slicing, never by torch.cat.
    mask = torch.ones(B, P + max_new_tokens, dtype=attention_mask.dtype, device=device)
    mask[:, :P] = attention_mask
    generated = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    position = attention_mask.long().cumsum(dim=1) - 1  # (B, P); left padding gets position -1 ...
    position = position.masked_fill(attention_mask == 0, 1)  # ... replaced by 1, as generate does
    next_pos = position[:, -1:] + 1  # (B, 1)

    extra = {"logits_to_keep": 1} if keep_arg else {}  # prefill: only the last position's logits
    out = model(input_ids=input_ids, attention_mask=mask[:, :P], position_ids=position, use_cache=True, **extra)
    cache = _returned_cache(out)
    logits = out.logits[:, -1, :vocab_size] if vocab_size else out.logits[:, -1]
    steps = 0
    try:
        for t in range(max_new_tokens):
            tok = next_tokens(logits, sample_temperature, top_p, gen)  # (B,)
            tok = tok.masked_fill(finished, pad_token_id)
            generated[:, t] = tok
            steps = t + 1
            if eos is not None:
                finished |= torch.isin(tok, eos)
                if bool(finished.all()):
                    break
            if t + 1 == max_new_tokens:
                break
            out = model(input_ids=tok[:, None], attention_mask=mask[:, :P + t + 1], position_ids=next_pos,
                        use_cache=True, **{cache_arg: cache})
            cache = _returned_cache(out)
            logits = out.logits[:, -1, :vocab_size] if vocab_size else out.logits[:, -1]
            next_pos = next_pos + 1
    finally:
        model.train(was_training)
    generated = generated[:, :steps]
    sequences = torch.cat([input_ids, generated], dim=1)  # (B, P + N')
    completion = torch.cat([torch.zeros_like(input_ids), completion_mask_from(generated, eos)], dim=1)
    return sequences, completion
