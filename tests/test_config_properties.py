"""Property test of the config loader: whatever recipe text and overrides it is fed, ``load_config`` returns a
valid ``RunConfig`` or raises ``DistilleryError`` with a one-line message, never another exception.

Recipes are generated three ways: YAML dumped from nested mappings built from the real section and key
names (plus misspellings and odd values), arbitrary text (including broken YAML and control characters)
and arbitrary bytes (not UTF-8); overrides from real and random dotted keys with YAML-ish values.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distillery.config import STUDENT_FAMILIES, RunConfig, load_config
from distillery.errors import DistilleryError

SECTIONS = {name: list(field.annotation.model_fields) for name, field in RunConfig.model_fields.items()}
KEYS = sorted({k for keys in SECTIONS.values() for k in keys}) + ["hidden_size", "hidden_sise", "model_type", ""]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12), st.sampled_from(["auto", "llama", "qwen2", "gpt2", "forward_kl", "jsd", "cache",
                                                           "pretrained", "pruned", "0", "1e3", "[1, 2]", ""]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=3), max_leaves=8)
sections = st.dictionaries(st.sampled_from(list(SECTIONS) + ["teachr", "extra"]),
                           st.dictionaries(st.sampled_from(KEYS), values, max_size=4) | scalars, max_size=4)
override_keys = st.one_of(
    st.builds(lambda s, k: f"{s}.{k}", st.sampled_from(list(SECTIONS)), st.sampled_from(KEYS)),
    st.builds(lambda k: f"student.model.{k}", st.sampled_from(KEYS)),
    st.text(alphabet="abtrain._=x \n", max_size=12))
overrides = st.lists(st.one_of(
    st.builds(lambda k, v: f"{k}={v}", override_keys, st.one_of(
        st.text(max_size=10), st.sampled_from(["0", "-1", ".inf", ".nan", "[0.9, 1.0]", "{a: 1}", "", "!!python/object:os.system x",
                                              "[[[[", "1e10", "true"]))),
    st.text(max_size=10)), max_size=3)


def _check(content: bytes, ovr: list[str]) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "recipe.yaml"
        p.write_bytes(content)
        try:
            cfg = load_config(p, ovr)
        except DistilleryError as exc:
            msg = str(exc)
            assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
            return
        assert isinstance(cfg, RunConfig)
        assert cfg.train.output_dir.strip()
        assert all(0 <= b < 1 for b in cfg.train.adam_betas)
        assert cfg.qat.group_size > 0 and cfg.qat.last_steps >= 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sections, overrides)
def test_generated_recipes_load_or_fail_in_one_line(recipe, ovr):
    _check(yaml.safe_dump(recipe, allow_unicode=True).encode("utf-8", "surrogatepass"), ovr)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200), overrides)
def test_arbitrary_text_loads_or_fails_in_one_line(text, ovr):
    _check(text.encode("utf-8", "surrogatepass"), ovr)


@settings(max_examples=80, deadline=None)
@given(st.binary(max_size=120))
def test_arbitrary_bytes_load_or_fail_in_one_line(data):
    _check(data, [])


def test_student_families_agree_with_students_module():
    from distillery.students import SUPPORTED_FAMILIES

    assert tuple(STUDENT_FAMILIES) == tuple(SUPPORTED_FAMILIES)


def test_merge_keys_are_not_duplicates(tmp_path):
    """``<<: *base`` then an explicit key is YAML's way to override; only a key written twice is refused."""
    p = tmp_path / "r.yaml"
    p.write_text("base: &b {max_steps: 5, lr: 0.01}\ntrain:\n  <<: *b\n  max_steps: 7\n")
    try:
        load_config(p)
    except DistilleryError as exc:
        assert "base" in str(exc) and "given twice" not in str(exc)  # 'base' is not a section: that is the error
    p.write_text("train:\n  <<: {max_steps: 5, lr: 0.01}\n  max_steps: 7\n")
    assert load_config(p).train.max_steps == 7
