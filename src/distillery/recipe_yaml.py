"""Reading a recipe's YAML and ``key=value`` overrides: every problem one line with the file and line.

Plain YAML, no knowledge of the sections (those are :mod:`distillery.config`'s pydantic models, which validate what
these functions return). Kept apart so ``config.py`` holds the settings alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import DistilleryError


def _show(text) -> str:
    """``text`` as it can stand in a one-line message (control characters escaped, long values cut)."""
    text = str(text)
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= 80 else text[:77] + "..."


class _DuplicateKey(Exception):
    """A mapping key given twice in one recipe (raised by :class:`_RecipeLoader`)."""


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping. YAML requires unique keys, but
    PyYAML keeps the last one silently: a second ``teacher:`` section would replace the first."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *base' may be overridden key by key
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if first != key_node.start_mark.line + 1:
                    raise _DuplicateKey(f"key '{_show(key)}' is given twice in one section (first at line {first}); "
                                        "YAML keeps only the last: remove one", key_node.start_mark.line + 1)
        return super().construct_mapping(node, deep=deep)


def read_recipe(p: Path) -> Any:
    """The recipe's YAML, decoded strictly as UTF-8; every problem a one-line error with file and line."""
    if p.is_dir():
        raise DistilleryError(f"recipe '{p}' is a folder, not a YAML file")
    if not p.is_file():
        raise DistilleryError(f"recipe '{p}' does not exist")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise DistilleryError(f"recipe '{p}': cannot read it ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DistilleryError(f"{p}:{line}: not UTF-8 text (byte offset {exc.start}: 0x{raw[exc.start]:02x}); "
                              "save the recipe as UTF-8") from None
    try:
        loader = _RecipeLoader(text)  # a SafeLoader: plain data only
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except _DuplicateKey as exc:
        raise DistilleryError(f"{p}:{exc.args[1]}: {exc.args[0]}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(exc, "problem", None) or getattr(exc, "reason", None) or exc).split())
        raise DistilleryError(f"{p}{where}: not valid YAML ({_show(problem)})") from None
    except RecursionError:
        raise DistilleryError(f"{p}: nested too deeply to be a recipe") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """``'train.max_steps=200'`` -> (['train', 'max_steps'], 200). Values are parsed as YAML scalars."""
    if "=" not in item:
        raise DistilleryError(f"override {item!r} is not of the form key=value (e.g. train.max_steps=200)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise DistilleryError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, RecursionError):
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise DistilleryError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data
