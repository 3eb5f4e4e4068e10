"""Batched KV-cached sampling from a Hugging Face causal LM, for on-policy distillation.

``sample`` runs one prefill over the left-padded prompts (the model's own forward), then one decode
step per new token for the rows still running. Two decoders do the steps:

* ``StaticDecoder`` (``static_decode``; Llama, Qwen2, Qwen3, Mistral: the student architectures): keys and
  values live in buffers allocated once and written in place; a step is a straight line of the model's own
  norms, RoPE and activation with its projection weights packed once per call for oneDNN (on CPU the
  8-row LM head GEMM ran ~2x faster packed). The generic forward rebuilds a 4-D mask, concatenates the
  cache and dispatches through several wrappers at every token.
* ``HFDecoder`` (any other causal LM): the model's forward with its ``DynamicCache``.

A row that has produced an EOS leaves the batch at once (``keep``): its cache rows are dropped and
the next steps run on the remaining rows only, so no work is spent on finished rows. Positions follow
the left padding (``position = cumsum(mask) - 1``), as ``model.generate`` does, so greedy ``sample``
matches greedy ``generate`` token for token (the same maths on the same numbers; the packed products and
attention over the cached columns differ from the generic path only by float rounding order).

``sample_temperature == 0`` is greedy (argmax) and ignores ``top_p`` and the generator.
"""

from __future__ import annotations

import functools
import inspect
import sys

import torch

from .errors import DistilleryError
from .hardware import cpu_bf16_fast
from .next_token import next_tokens  # noqa: F401 (the sampler's draw; also imported from here)
from .static_decode import PackCache, StaticDecoder

SCREEN_MIN_HEAD = 4_000_000  # head weights below this: the screen's fixed costs exceed what bf16 saves (vocab 512: slower)
STATIC_TYPES = ("llama", "qwen2", "qwen3", "mistral")  # decoder layers of the Llama shape (pre-norm, RoPE, GQA)


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


def static_decode_supported(model, total_length: int) -> bool:
    """True when ``StaticDecoder`` can run ``model`` for sequences of ``total_length`` tokens: a Llama-shaped
    architecture (``STATIC_TYPES``), full attention over that length, and plain (not FSDP-sharded) weights,
    since the decoder calls submodules whose parameters a sharding wrapper gathers only in the layer's forward."""
    cfg = model.config
    if getattr(cfg, "model_type", None) not in STATIC_TYPES or not hasattr(getattr(model, "model", None), "rotary_emb"):
        return False
    window = getattr(cfg, "sliding_window", None)
    if window is not None and getattr(cfg, "use_sliding_window", True) and window < total_length:
        return False
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return False
    if getattr(sys.modules.get(type(model).__module__), "apply_rotary_pos_emb", None) is None:
        return False
    p = next(model.parameters())
    return type(p).__name__ != "DTensor" and type(p.data).__name__ != "DTensor"


class HFDecoder:
    """Decode steps through the model's own forward and ``DynamicCache`` (any causal LM)."""

    def __init__(self, model, cache, mask: torch.Tensor, vocab_size: int | None):
        self.model, self.cache, self.vocab_size = model, cache, vocab_size
        self.mask = mask  # (b, P + N): 1 on real tokens; grows by slicing
        self.length = cache.get_seq_length()
        self.cache_arg = _forward_args(type(model))[0]

    def keep(self, rows: torch.Tensor) -> None:
        """Drop every batch row not in ``rows`` (indices into the current batch)."""
        self.cache.reorder_cache(rows)
        self.mask = self.mask[rows]

    @staticmethod
    def choose(logits: torch.Tensor, sample_temperature: float, top_p: float,
               generator: torch.Generator | None) -> torch.Tensor:
        return next_tokens(logits, sample_temperature, top_p, generator)

    def step(self, tok: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """``tok (b,)`` at ``position (b, 1)`` → next-token logits ``(b, V)``."""
        self.length += 1
        out = self.model(input_ids=tok[:, None], attention_mask=self.mask[:, :self.length], position_ids=position,
                         use_cache=True, **{self.cache_arg: self.cache})
        self.cache = _returned_cache(out)
        return out.logits[:, -1, :self.vocab_size] if self.vocab_size else out.logits[:, -1]


@torch.no_grad()
def sample(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
           sample_temperature: float = 1.0, top_p: float = 1.0, eos_token_id: int | list[int] | None = None,
           pad_token_id: int = 0, generator: torch.Generator | None = None,
           vocab_size: int | None = None, decoder: str = "auto", head: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
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
        decoder: ``"auto"`` (``StaticDecoder`` where ``static_decode_supported``, else ``HFDecoder``),
            ``"static"`` or ``"hf"``.
        head: how the static decoder picks tokens from an fp32 LM head: ``"screened"`` screens in bf16 and
            rescores the best few in fp32 with an error certificate (``screened_head``: the same tokens as
            the fp32 head, sampling exact, at bf16 speed; ``top_p == 1`` only), ``"plain"`` runs the fp32
            head, ``"auto"`` screens on a CPU where bf16 is fast (``hardware.cpu_bf16_fast``)
            and the head has at least ``SCREEN_MIN_HEAD`` weights.

    Returns:
        sequences ``(B, P + N')`` int64 (``N' ≤ N`` steps run): prompt, then the generated tokens,
        then ``pad_token_id`` after each row's first EOS;
        completion_mask ``(B, P + N')`` int64: 1 on generated tokens up to and including the first
        EOS, 0 on the prompt, the prompt padding and everything after the EOS.

    The model runs in eval mode for the call (its previous mode is restored). A row leaves the batch
    after its EOS, so with sampling its later draws (not its tokens' distribution) depend on which rows
    are still running.
    """
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise DistilleryError(f"sample: input_ids {tuple(input_ids.shape)} and attention_mask "
                              f"{tuple(attention_mask.shape)} must both be (B, P)")
    if max_new_tokens <= 0:
        raise DistilleryError(f"sample: max_new_tokens must be positive (got {max_new_tokens})")
    if bool((attention_mask[:, -1] == 0).any()):
        raise DistilleryError("sample: prompts must be left-padded (attention_mask[:, -1] must be 1 in every row)")
    if decoder not in ("auto", "static", "hf"):
        raise DistilleryError(f"sample: decoder must be 'auto', 'static' or 'hf' (got {decoder!r})")
    if head not in ("auto", "screened", "plain"):
        raise DistilleryError(f"sample: head must be 'auto', 'screened' or 'plain' (got {head!r})")
    device = input_ids.device
    B, P = input_ids.shape
    static = decoder == "static" or (decoder == "auto" and static_decode_supported(model, P + max_new_tokens))
    if decoder == "static" and not static_decode_supported(model, P + max_new_tokens):
        raise DistilleryError(f"sample: decoder='static' does not support {type(model).__name__} "
                              f"(Llama-shaped full-attention models only: {', '.join(STATIC_TYPES)})")
    head_w = getattr(model.get_output_embeddings(), "weight", None)
    screen = head == "screened" or (head == "auto" and device.type == "cpu" and head_w is not None
                                    and head_w.numel() >= SCREEN_MIN_HEAD and cpu_bf16_fast())
    eos = _eos_tensor(eos_token_id, device)
    gen = _device_generator(generator, device)
    keep_arg = _forward_args(type(model))[1]
    was_training = model.training
    model.eval()

    mask = torch.ones(B, P + max_new_tokens, dtype=attention_mask.dtype, device=device)
    mask[:, :P] = attention_mask
    generated = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    rows = torch.arange(B, device=device)  # original row of each row still running
    position = attention_mask.long().cumsum(dim=1) - 1  # (B, P); left padding gets position -1 ...
    position = position.masked_fill(attention_mask == 0, 1)  # ... replaced by 1, as generate does
    next_pos = position[:, -1:] + 1  # (B, 1)

    extra = {"logits_to_keep": 1} if keep_arg else {}  # prefill: only the last position's logits
    try:
        if static:  # the backbone's forward; the decoder's head then runs on the last position only
            out = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position, use_cache=True)
            # a model not in training keeps its packed weights between calls (StaticDecoder.reuse checks they are current)
            packs = None if was_training else model.__dict__.setdefault("_distillery_packs", PackCache())
            dec = StaticDecoder(model, _returned_cache(out), mask, vocab_size, screen_head=screen, packs=packs)
            head_in = out.last_hidden_state[:, -1]  # (B, H), after the final norm
        else:
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position, use_cache=True, **extra)
            head_in = out.logits[:, -1, :vocab_size] if vocab_size else out.logits[:, -1]  # (B, V)
            dec = HFDecoder(model, _returned_cache(out), mask, vocab_size)
        del out
        steps = 0
        for t in range(max_new_tokens):
            tok = dec.choose(head_in, sample_temperature, top_p, gen)  # (b,)
            generated[rows, t] = tok
            steps = t + 1
            if t + 1 == max_new_tokens:
                break
            if eos is not None:
                running = ~torch.isin(tok, eos)
                if not bool(running.all()):  # some rows just ended: drop them from the batch
                    if not bool(running.any()):
                        break
                    keep = running.nonzero().squeeze(1)
                    rows, tok, next_pos = rows[keep], tok[keep], next_pos[keep]
                    dec.keep(keep)
            head_in = dec.step(tok, next_pos)
            next_pos = next_pos + 1
    finally:
        model.train(was_training)
    generated = generated[:, :steps]
    sequences = torch.cat([input_ids, generated], dim=1)  # (B, P + N')
    completion = torch.cat([torch.zeros_like(input_ids), completion_mask_from(generated, eos)], dim=1)
    return sequences, completion
