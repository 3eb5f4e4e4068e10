"""docs/architecture.md against the code: every name in its "Parts" table imports from the module of its row, and
every signature shown there lists the function's parameters in order (``*`` where keyword-only ones start,
``...`` for further options) with its return type."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
CALL = re.compile(r"^(?P<name>[A-Za-z_][\w.]*)\((?P<params>[^()]*)\)(?:\s*->\s*(?P<ret>\w+))?$")
NAME = re.compile(r"^[A-Za-z_]\w*$")
EXTERNAL = ("Tensor", "PreTrainedModel", "Iterator")  # torch's, transformers', typing's


def doc_rows() -> list[tuple[str, list[str]]]:
    rows = []
    table = DOC.read_text().split("## Parts", 1)[1]
    for line in table.splitlines():
        m = re.match(r"^\| `(distillery[\w.]*)` \| (.*) \|$", line)
        if m:
            rows.append((m.group(1), re.findall(r"`([^`]+)`", m.group(2))))
    return rows


def shown(fn) -> list[str]:
    """The parameter list as the doc writes it."""
    out, star = [], False
    for p in inspect.signature(fn).parameters.values():
        if p.kind == p.KEYWORD_ONLY and not star:
            out.append("*")
            star = True
        out.append({p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name)
        star = star or p.kind == p.VAR_POSITIONAL
    return out


def return_name(fn) -> str:
    ann = inspect.signature(fn).return_annotation
    text = ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann))
    return re.split(r"[\[|]", text.strip("'\" "))[0].split(".")[-1].strip()


def test_the_table_covers_the_parts():
    modules = [m for m, _ in doc_rows()]
    assert len(modules) >= 15 and modules[0] == "distillery"
    for m in modules:
        importlib.import_module(m)


@pytest.mark.parametrize("module, spans", doc_rows(), ids=[m for m, _ in doc_rows()])
def test_every_documented_name_and_signature(module, spans):
    mod = importlib.import_module(module)
    checked = 0
    for span in spans:
        call = CALL.match(span)
        if call:
            owner, _, attr = call.group("name").rpartition(".")
            obj = getattr(getattr(mod, owner) if owner else mod, attr, None)
            assert obj is not None, f"{module}.{call.group('name')} does not exist"
            params = [p.strip() for p in call.group("params").split(",") if p.strip()]
            real = shown(obj)[1:] if owner else shown(obj)  # a method of a documented class: without self
            if params and params[-1] == "...":
                params = params[:-1]
                assert real[:len(params)] == params and len(real) > len(params), (span, real)
            else:
                assert real == params, (span, real)
            if call.group("ret"):
                assert return_name(obj) == call.group("ret"), (span, return_name(obj))
            checked += 1
        elif NAME.match(span) and span[0].isupper() and not span.isupper():  # a class or type the row names
            homes = (mod, importlib.import_module("distillery"), importlib.import_module("distillery.targets"))
            if any(hasattr(h, span) for h in homes) or span in EXTERNAL:
                checked += 1
                continue
            pytest.fail(f"{module}.{span} does not exist")
    assert checked > 0, f"row {module} documents nothing checkable"


def test_a_wrong_signature_would_be_caught():
    """The checker itself: a doc that listed load_config's parameters in another order fails."""
    import distillery.config as config

    assert shown(config.load_config) == ["path", "overrides"] != ["overrides", "path"]
    assert return_name(config.load_config) == "RunConfig"
