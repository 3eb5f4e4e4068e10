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

Messages arrive in OpenAI's format, normalised by the reader (content parts joined, ``tool_calls``
kept). Before rendering, :func:`prepare_messages` fits them to the template: the ``developer`` role
becomes ``system`` when the template never names ``developer``; a tool call that the template would
drop (it never reads ``tool_calls``) is an error, not a silently empty assistant turn. ``data.chat_template``
replaces the tokenizer's template (:func:`use_chat_template`: a Jinja file, or ``chatml``: plain ChatML,
no default system prompt, tool calls as Hermes/Qwen ``<tool_call>`` blocks, assistant tokens tagged).
:func:`default_system_prompt` finds the system prompt a template adds to conversations that have none
(SmolLM2's adds "You are a helpful AI assistant named SmolLM..."), which ``build_datasets`` reports.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import DistilleryError
from .readers import Record

_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")

# Plain ChatML: no default system prompt; any role by name; an assistant's tool calls as <tool_call> JSON
# blocks (the Hermes / Qwen2.5 convention); assistant content and tool calls inside {% generation %} tags.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] or '' }}"
    "{% for call in message.get('tool_calls') or [] %}{% set f = call.get('function', call) %}"
    "{{ '\n<tool_call>\n' + ({'name': f['name'], 'arguments': f.get('arguments', {})} | tojson) + '\n</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML}


def use_chat_template(tokenizer, choice: str | None) -> None:
    """``data.chat_template``: None keeps the tokenizer's own; a name from :data:`NAMED_TEMPLATES`, or a path
    to a Jinja file, replaces it on ``tokenizer`` (which the student is saved with, so it ships the template
    it was trained on)."""
    if choice is None:
        return
    if choice in NAMED_TEMPLATES:
        missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in tokenizer.get_vocab()]
        if missing:
            raise DistilleryError(f"data.chat_template '{choice}' needs the tokens {' and '.join(missing)}, which "
                                  "this tokenizer does not have: give a Jinja template file that fits it")
        tokenizer.chat_template = NAMED_TEMPLATES[choice]
        return
    path = Path(choice).expanduser()
    if not path.is_file():
        raise DistilleryError(f"data.chat_template '{choice}' is neither a file nor a named template "
                              f"({', '.join(NAMED_TEMPLATES)})")
    try:
        tokenizer.chat_template = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DistilleryError(f"data.chat_template '{choice}': cannot read it ({exc})") from None


def prepare_messages(messages: list[dict], tokenizer, where: str) -> list[dict]:
    """Fit OpenAI-format messages to the template: ``developer`` -> ``system`` when the template never names
    ``developer``; tool calls refused when it never reads ``tool_calls`` (they would vanish from the text)."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    out = []
    for i, m in enumerate(messages):
        if m["role"] == "developer" and "developer" not in template:
            m = {**m, "role": "system"}
        if m.get("tool_calls") and "tool_calls" not in template:
            raise DistilleryError(f"{where}: messages[{i}] makes tool calls, which this chat template does not render "
                                  "(it never reads 'tool_calls'): set data.chat_template (e.g. 'chatml') to one that does")
        out.append(m)
    return out


def default_system_prompt(tokenizer) -> str | None:
    """The system text the template adds to a conversation that has no system message, or None.

    Found by rendering one user turn with and without a system message: the system turn's opening is what
    precedes the system content; if the system-less rendering also starts with it, the text up to the user
    turn is the template's own system prompt."""
    sys_probe, user_probe = "SYSPROBE_d1st", "USERPROBE_d1st"
    try:
        with_sys = _text(tokenizer, [{"role": "system", "content": sys_probe}, {"role": "user", "content": user_probe}])
        bare = _text(tokenizer, [{"role": "user", "content": user_probe}])
    except Exception:  # a template that refuses a lone user turn: nothing to report
        return None
    if sys_probe not in with_sys or user_probe not in with_sys:
        return None
    opening = with_sys[:with_sys.index(sys_probe)]
    between = with_sys[with_sys.index(sys_probe) + len(sys_probe):with_sys.index(user_probe)]
    end = bare.find(between + user_probe)
    if not opening or not bare.startswith(opening) or end < len(opening):
        return None
    return bare[len(opening):end] or None


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
    messages = prepare_messages(record.messages, tokenizer, record.where)
    try:
        if not use_tags:
            return _mask_by_prefixes(tokenizer, messages, record.where)
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return list(out["input_ids"]), [int(a) for a in out["assistant_masks"]]
    except DistilleryError:
        raise
    except Exception as exc:  # jinja errors raised by the template (e.g. "roles must alternate")
        raise DistilleryError(f"{record.where}: the chat template failed on this conversation ({exc})") from None
