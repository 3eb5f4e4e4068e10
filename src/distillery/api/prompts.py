"""Prompts in, work items out: reading prompt files and giving every record a stable id.

A prompt file is either

* JSONL: one object per line with ``prompt`` (a string, sent as one user message) or ``messages``
  (a chat, ``[{"role": ..., "content": ...}, ...]``; a trailing assistant turn is dropped so chat data
  sets can be reused as prompts), or
* text: one prompt per line (blank lines are skipped).

A record id is ``sha256`` of the canonical JSON of (model, prompt messages, sampling settings, sample
index), cut to 32 hex digits. It does not depend on file names, line numbers, order, concurrency or
limits, so reordering or splitting prompt files, or raising ``n``, keeps the ids of the records
already written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import DistilleryError

ROLES = ("system", "user", "assistant", "tool")  # the roles distillery.data accepts


@dataclass(frozen=True)
class Prompt:
    """One prompt: its chat messages and where it came from (``file:line``, informational only)."""

    messages: tuple[tuple[str, str], ...]
    source: str

    def as_messages(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]


@dataclass(frozen=True)
class WorkItem:
    """One record to produce: a prompt, which sample of it, and the record's id."""

    id: str
    prompt: Prompt
    sample_index: int


def record_id(messages: list[dict[str, str]], model: str, sampling: dict[str, Any], sample_index: int) -> str:
    """Stable id of one record: hash of (model, messages, sampling settings, sample index)."""
    payload = {"model": model, "messages": [[m["role"], m["content"]] for m in messages],
               "sampling": sampling, "sample": sample_index}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def _chat_from_json(obj: Any, where: str) -> list[tuple[str, str]]:
    if not isinstance(obj, dict):
        raise DistilleryError(f"{where}: a prompt line must be a JSON object with 'prompt' or 'messages'")
    if isinstance(obj.get("prompt"), str):
        if not obj["prompt"].strip():
            raise DistilleryError(f"{where}: 'prompt' is empty")
        return [("user", obj["prompt"])]
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise DistilleryError(f"{where}: needs a string 'prompt' or a non-empty list 'messages'")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DistilleryError(f"{where}: messages[{i}] must be {{'role': one of {ROLES}, 'content': str}}")
        out.append((m["role"], m["content"]))
    while out and out[-1][0] == "assistant":
        out.pop()  # a chat data set used as prompts: the teacher writes the answer
    if not out:
        raise DistilleryError(f"{where}: 'messages' has no turn before the assistant's")
    return out


def read_prompts(paths: list[str], system_prompt: str | None = None) -> Iterator[Prompt]:
    """Yield the prompts of every file in order; a bad line raises :class:`DistilleryError` naming file and line."""
    if not paths:
        raise DistilleryError("api.prompts: no prompt files given")
    for p in map(Path, paths):
        if not p.is_file():
            raise DistilleryError(f"prompt file '{p}' does not exist")
        is_jsonl = p.suffix == ".jsonl"
        with p.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                where = f"{p}:{lineno}"
                if not line.strip():
                    continue
                if is_jsonl:
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DistilleryError(f"{where}: not valid JSON ({exc.msg})") from None
                    chat = _chat_from_json(obj, where)
                else:
                    chat = [("user", line.rstrip("\r\n"))]
                if system_prompt is not None and chat[0][0] != "system":
                    chat.insert(0, ("system", system_prompt))
                yield Prompt(tuple(chat), where)


def plan(prompts: Iterator[Prompt], model: str, sampling: dict[str, Any], n: int) -> tuple[list[WorkItem], int]:
    """Expand prompts into ``n`` work items each, dropping repeats of the same id.

    Returns ``(items, duplicates)``; a prompt that appears twice yields its records once.
    """
    seen: set[str] = set()
    items: list[WorkItem] = []
    duplicates = 0
    for pr in prompts:
        msgs = pr.as_messages()
        for i in range(n):
            rid = record_id(msgs, model, sampling, i)
            if rid in seen:
                duplicates += 1
                continue
            seen.add(rid)
            items.append(WorkItem(rid, pr, i))
    return items, duplicates
