"""Property-based tests (hypothesis): the config loader and the data readers never fail with anything
but a one-line :class:`DistilleryError`, and the readers' errors always name ``file:line``."""

from __future__ import annotations

import json
import re
import string
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distillery.config import DataConfig, RunConfig, load_config
from distillery.data import read_records
from distillery.errors import DistilleryError

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _known_keys() -> list[str]:
    keys = []
    for section, field in RunConfig.model_fields.items():
        keys += [f"{section}.{name}" for name in field.annotation.model_fields]
    return keys


KEYS = _known_keys()
key = st.one_of(st.sampled_from(KEYS), st.sampled_from(list(RunConfig.model_fields)),
                st.text(alphabet=string.ascii_lowercase + "._", min_size=0, max_size=20),
                st.builds(lambda k, s: f"{k}.{s}", st.sampled_from(KEYS), st.text(string.ascii_lowercase, max_size=5)))
value = st.one_of(st.text(max_size=20), st.integers(-10**12, 10**12).map(str), st.floats(allow_nan=True).map(str),
                  st.sampled_from(["true", "null", "[1, 2]", "{a: 1}", "-", "[", "'", "~", "1e999", "!!python/none"]))
override = st.one_of(st.builds(lambda k, v: f"{k}={v}", key, value), st.text(max_size=30))


def _one_line_error(exc: DistilleryError) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg, repr(msg)
    return msg


@SETTINGS
@given(st.lists(override, max_size=6))
def test_random_overrides_load_or_raise_a_one_line_distillery_error(overrides):
    try:
        cfg = load_config(None, overrides)
    except DistilleryError as exc:
        _one_line_error(exc)
    else:
        assert isinstance(cfg, RunConfig)


@SETTINGS
@given(st.one_of(st.text(max_size=200),
                 st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10)),
                              lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.sampled_from(list(RunConfig.model_fields) + ["x"]),
                                                                      inner, max_size=3)),
                              max_leaves=12).map(json.dumps)))
def test_random_recipe_files_load_or_raise_a_one_line_distillery_error(text):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "recipe.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            load_config(path)
        except DistilleryError as exc:
            _one_line_error(exc)


json_value = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=12)),
                          lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                          max_leaves=8)
record = st.one_of(
    st.builds(lambda t: json.dumps({"text": t}), st.text(max_size=40)),
    st.builds(lambda m: json.dumps({"messages": m}), st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "robot"]), "content": st.text(max_size=10)}), max_size=3)),
    json_value.map(json.dumps),
    st.text(max_size=40).filter(lambda s: "\n" not in s and "\r" not in s),
)


@SETTINGS
@given(st.lists(record, min_size=1, max_size=8), st.sampled_from(["jsonl", "chat", "auto"]))
def test_random_jsonl_lines_parse_or_name_file_and_line(lines, fmt):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "data.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        try:
            recs = list(read_records([str(path)], DataConfig(train=[str(path)], format=fmt)))
        except DistilleryError as exc:
            msg = _one_line_error(exc)
            m = re.search(re.escape(str(path)) + r":(\d+)", msg)
            assert m, msg
            assert 1 <= int(m.group(1)) <= len(lines), msg
        else:
            for r in recs:
                assert r.source == str(path) and 1 <= r.line <= len(lines)
                assert (r.text is not None) != (r.messages is not None)
