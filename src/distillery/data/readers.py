"""Readers: turn ``data.train`` / ``data.validation`` entries into records, one per document.

An entry is a file, a folder (searched recursively, files sorted by relative path) or a built-in
corpus (``demo:shakespeare``, ``demo:milton``). Each file is read in one format:

* ``text``: the whole file is one document (``.txt``, ``.md``, ``.rst``, any of them ``.gz``);
* ``jsonl``: one JSON object per line, its ``cfg.text_field`` string is a document;
* ``chat``: one JSON object per line with ``messages``: a list of ``{"role", "content"}``.

``format: auto`` decides per file: a ``.jsonl`` (or ``.jsonl.gz``) file whose first record has
``messages`` is chat, otherwise jsonl; every other file is text. Blank JSONL lines are skipped.
Anything malformed raises :class:`DistilleryError` naming ``file:line``.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

from ..errors import DistilleryError
from ..hashing import file_sha256

DEMO_CORPORA = {"demo:shakespeare": "shakespeare8.txt.gz", "demo:milton": "paradise_lost.txt.gz"}
TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl",)
ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True)
class Source:
    """One input file. ``name`` is what messages and fingerprints show (the path, or ``demo:...``)."""

    name: str
    path: Any  # pathlib.Path, or an importlib.resources Traversable for the built-in corpora
    format: str  # 'text' | 'jsonl' | 'chat' (resolved, never 'auto')

    @property
    def gz(self) -> bool:
        return str(self.path).endswith(".gz")

    def open(self) -> io.BufferedIOBase:
        """Binary stream of the (decompressed) contents."""
        raw = self.path.open("rb")
        return gzip.GzipFile(fileobj=raw) if self.gz else raw

    def info(self) -> dict:
        """``{"path", "format", "size", "sha256"}`` of the file as stored (compressed bytes for .gz)."""
        return {"path": self.name, "format": self.format, "size": self.path.stat().st_size,
                "sha256": file_sha256(self.path)}


@dataclass
class Record:
    """One document: ``text`` (text/jsonl) or ``messages`` (chat), and where it came from."""

    source: str
    line: int
    text: str | None = None
    messages: list[dict] | None = None

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def _stem_suffix(name: str) -> str:
    """'a/b.JSONL.gz' -> '.jsonl' (the suffix that decides the format)."""
    n = name.lower()
    if n.endswith(".gz"):
        n = n[:-3]
    return Path(n).suffix


def _accepted_suffixes(fmt: str) -> tuple[str, ...]:
    if fmt == "text":
        return TEXT_SUFFIXES
    if fmt in ("jsonl", "chat"):
        return JSONL_SUFFIXES
    return TEXT_SUFFIXES + JSONL_SUFFIXES


def _first_record(path: Any, name: str) -> Any:
    src = Source(name, path, "jsonl")
    try:
        with src.open() as fh:
            for raw in fh:
                if raw.strip():
                    return json.loads(raw)
    except (ValueError, OSError, EOFError, zlib.error):
        return None  # the real read reports it with its line number
    return None


def _resolve_format(path: Any, name: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if _stem_suffix(name) in JSONL_SUFFIXES:
        first = _first_record(path, name)
        return "chat" if isinstance(first, dict) and "messages" in first else "jsonl"
    return "text"


def resolve_sources(entries: list[str], fmt: str = "auto") -> list[Source]:
    """Expand config entries into files (folders recursively, sorted), each with its format."""
    out: list[Source] = []
    for entry in entries:
        if entry.startswith("demo:"):
            if entry not in DEMO_CORPORA:
                raise DistilleryError(f"unknown built-in corpus '{entry}' (choose from {', '.join(DEMO_CORPORA)})")
            asset = resources.files("distillery") / "assets" / DEMO_CORPORA[entry]
            out.append(Source(entry, asset, "text" if fmt == "auto" else fmt))
            continue
        p = Path(entry).expanduser()
        if p.is_dir():
            wanted = _accepted_suffixes(fmt)
            files = sorted((f for f in p.rglob("*") if f.is_file() and _stem_suffix(f.name) in wanted),
                           key=lambda f: f.relative_to(p).as_posix())
            if not files:
                kinds = "/".join(wanted)
                raise DistilleryError(f"data folder '{entry}' holds no {kinds} files (plain or .gz)")
            out.extend(Source(str(f), f, _resolve_format(f, str(f), fmt)) for f in files)
        elif p.is_file():
            out.append(Source(entry, p, _resolve_format(p, entry, fmt)))
        else:
            raise DistilleryError(f"data file or folder '{entry}' does not exist")
    return out


def _read_text(src: Source) -> Iterator[Record]:
    try:
        with src.open() as fh:
            data = fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DistilleryError(f"{src.name}: cannot read ({exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DistilleryError(f"{src.name}:{line}: not UTF-8 text (byte {exc.start})") from None
    yield Record(src.name, 1, text=text.removeprefix("\ufeff"))


_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_unicode(text: str, where: str) -> None:
    """Refuse a lone surrogate (``"\\ud800"``, common in scraped text): ``json.loads`` accepts the escape, but
    the string is not valid Unicode and the tokenizer (or any UTF-8 encoder) fails on it far from here."""
    m = _SURROGATE.search(text)
    if m:
        raise DistilleryError(f"{where} holds a lone surrogate \\u{ord(m.group()):04x} at character {m.start()}: "
                              "not valid Unicode text; fix or drop the record")


def _check_messages(messages: Any, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DistilleryError(f"{where}: 'messages' must be a non-empty list, got {type(messages).__name__}")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DistilleryError(f"{where}: messages[{i}] must be an object with role and content")
        role = m.get("role")
        if role not in ROLES:
            raise DistilleryError(f"{where}: messages[{i}] has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        calls = _tool_calls(m.get("tool_calls"), role, f"{where}: messages[{i}]")
        content = _content_text(m.get("content"), bool(calls), f"{where}: messages[{i}].content")
        _check_unicode(content, f"{where}: messages[{i}].content")
        msg = {"role": role, "content": content}
        if calls:
            msg["tool_calls"] = calls
        msg.update({k: m[k] for k in ("tool_call_id", "name") if isinstance(m.get(k), str)})
        clean.append(msg)
    if not any(m["role"] == "assistant" for m in clean):
        raise DistilleryError(f"{where}: conversation has no assistant turn (nothing to learn from)")
    return clean


def _content_text(content: Any, has_calls: bool, where: str) -> str:
    """OpenAI's ``content``: a string, a list of parts of which only ``{"type": "text", "text": ...}`` is text
    (joined with newlines, as vLLM's server does), or null beside tool calls (then empty)."""
    if isinstance(content, str):
        return content
    if content is None and has_calls:
        return ""
    if isinstance(content, list) and content:
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise DistilleryError(f"{where}[{j}] is a {kind!r} part: only text parts ({{\"type\": \"text\", "
                                      "\"text\": ...}) can be distilled")
            texts.append(part["text"])
        return "\n".join(texts)
    raise DistilleryError(f"{where} must be a string or a list of text parts, got {type(content).__name__}")


def _tool_calls(calls: Any, role: str, where: str) -> list[dict]:
    """An assistant's OpenAI ``tool_calls``: ``[{"type": "function", "function": {"name", "arguments"}}]``.
    ``arguments`` (a JSON string in OpenAI's format) becomes an object, as Hugging Face chat templates expect."""
    if calls is None or calls == []:
        return []
    if role != "assistant" or not isinstance(calls, list):
        raise DistilleryError(f"{where}.tool_calls must be a list on an assistant message")
    out = []
    for j, call in enumerate(calls):
        f = call.get("function") if isinstance(call, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise DistilleryError(f"{where}.tool_calls[{j}] must be {{\"type\": \"function\", \"function\": "
                                  "{\"name\": ..., \"arguments\": ...}}")
        args = f.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as exc:
                raise DistilleryError(f"{where}.tool_calls[{j}].function.arguments is not JSON ({exc.msg})") from None
        out.append({**call, "type": call.get("type", "function"), "function": {"name": f["name"], "arguments": args}})
    return out


def _read_jsonl(src: Source, text_field: str) -> Iterator[Record]:
    try:
        with src.open() as fh:
            yield from _parse_jsonl(fh, src, text_field)
    except (OSError, EOFError, zlib.error) as exc:
        raise DistilleryError(f"{src.name}: cannot read ({exc})") from None


def _parse_jsonl(fh, src: Source, text_field: str) -> Iterator[Record]:
    for lineno, raw in enumerate(fh, start=1):
        where = f"{src.name}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DistilleryError(f"{where}: not UTF-8 text") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DistilleryError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise DistilleryError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        if src.format == "chat":
            if "messages" not in obj:
                raise DistilleryError(f"{where}: chat record has no 'messages' field")
            yield Record(src.name, lineno, messages=_check_messages(obj["messages"], where))
        else:
            if text_field not in obj:
                keys = ", ".join(k if k.isprintable() else repr(k) for k in sorted(obj)) or "none"
                raise DistilleryError(f"{where}: record has no '{text_field}' field (data.text_field; keys: {keys})")
            text = obj[text_field]
            if not isinstance(text, str):
                raise DistilleryError(f"{where}: field '{text_field}' must be a string, got {type(text).__name__}")
            _check_unicode(text, f"{where}: field '{text_field}'")
            yield Record(src.name, lineno, text=text)


def read_source(src: Source, text_field: str = "text") -> Iterator[Record]:
    """Records of one file, in file order."""
    if src.format == "text":
        return _read_text(src)
    return _read_jsonl(src, text_field)


def read_records(paths: list[str], cfg) -> Iterator[Record]:
    """Records of every file named by ``paths`` (config entries), read as ``cfg.format`` says."""
    for src in resolve_sources(list(paths), cfg.format):
        yield from read_source(src, cfg.text_field)
