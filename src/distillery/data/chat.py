"""Render chat conversations to token ids plus a mask of the assistant's tokens (the loss targets).

Two ways to find the assistant tokens:

* **generation tags** (preferred): the chat template wraps assistant content in
  ``{% generation %}...{% endgeneration %}`` and ``apply_chat_template(...,
  return_assistant_tokens_mask=True)`` marks exactly those tokens.
* **prefix rendering** (fallback, for templates without the tags, e.g. SmolLM2's): for each
  assistant turn ``i``, render ``messages[:i]`` with ``add_generation_prompt=True`` (the text up
  to where the assistant starts) and ``messages[:i+1]`` (up to where it ends); both must be text
  prefixes of the full rendering, and the characters between them, trailing whitespace left out
  (the newline after ``<|im_end|>``), are the assistant's: content plus end-of-turn token, as with
  generation tags. The full text is tokenized once, as ``apply_chat_template`` does
  (``add_special_tokens=False``), and a token is the assistant's when its first character lies in
  such a span. A template whose prefixes do not line up (one that rewrites earlier turns, or
  injects a system prompt only when a turn follows) is an error naming the record.
"""

from __future__ import annotations

import re

from ..errors import DistilleryError
from .readers import Record

_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


def has_generation_tags(tokenizer) -> bool:
    """True when the chat template marks assistant tokens with ``{% generation %}``."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and bool(_GENERATION_TAG.search(template))


def _text(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _mask_by_prefixes(tokenizer, messages: list[dict], where: str) -> tuple[list[int], list[int]]:
    """Assistant spans as character ranges of the rendered text, mapped to tokens by their offsets."""
    full = _text(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _text(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _text(tokenizer, messages[:i + 1])
        if not (upto.startswith(before) and full.startswith(upto)):
            raise DistilleryError(f"{where}: the chat template does not render messages[:{i}] as a prefix of the "
                                  f"conversation, so assistant turn {i} cannot be located (add {{% generation %}} "
                                  "tags to the template)")
        spans.append((len(before), len(upto.rstrip())))
    if not getattr(tokenizer, "is_fast", False):
        raise DistilleryError(f"{where}: locating assistant turns without {{% generation %}} tags needs a fast "
                              "tokenizer (character offsets)")
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    mask = [int(any(lo <= start < hi for lo, hi in spans)) for start, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def render_chat(record: Record, tokenizer, use_tags: bool | None = None) -> tuple[list[int], list[int]]:
    """``(ids, mask)`` of one conversation: ``mask[t] = 1`` where token ``t`` is written by the assistant.

    ``use_tags=None`` picks generation tags when the template has them, else prefix rendering.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DistilleryError(f"{record.where}: chat data needs a tokenizer with a chat template, and this one has none")
    if use_tags is None:
        use_tags = has_generation_tags(tokenizer)
    try:
        if not use_tags:
            return _mask_by_prefixes(tokenizer, record.messages, record.where)
        out = tokenizer.apply_chat_template(record.messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return list(out["input_ids"]), [int(a) for a in out["assistant_masks"]]
    except DistilleryError:
        raise
    except Exception as exc:  # jinja errors raised by the template (e.g. "roles must alternate")
        raise DistilleryError(f"{record.where}: the chat template failed on this conversation ({exc})") from None
