"""Config: YAML + overrides, unknown keys and wrong types are one-line errors naming the key."""

import pytest

from distillery.config import RunConfig, dump_config, load_config
from distillery.errors import DistilleryError


def test_defaults_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  max_steps: 7\nloss:\n  kd: jsd\n  beta: 0.3\n")
    cfg = load_config(recipe, ["train.lr=0.01", "data.train=[a.txt, b.txt]", "loss.beta=0.25"])
    assert cfg.train.max_steps == 7 and cfg.train.lr == 0.01
    assert cfg.loss.kd == "jsd" and cfg.loss.beta == 0.25
    assert cfg.data.train == ["a.txt", "b.txt"]


def test_roundtrip_dump(tmp_path):
    cfg = load_config(None, ["train.max_steps=3"])
    p = tmp_path / "dump.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg


@pytest.mark.parametrize("override, needle", [
    (["train.max_stepz=3"], "config key 'train.max_stepz' is not a known setting"),
    (["train.max_steps=abc"], "config key 'train.max_steps'"),
    (["loss.kd=foo"], "config key 'loss.kd'"),
    (["loss.beta=2"], "config key 'loss.beta'"),
    (["nosuchsection.x=1"], "config key 'nosuchsection' is not a known setting"),
    (["justtext"], "not of the form key=value"),
    (["train.max_steps.x=1"], "config key 'train.max_steps'"),
])
def test_bad_overrides(override, needle):
    with pytest.raises(DistilleryError) as e:
        load_config(None, override)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_recipe_files(tmp_path):
    with pytest.raises(DistilleryError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: [1,\n")
    with pytest.raises(DistilleryError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(DistilleryError, match="must be a mapping"):
        load_config(lst)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  lr: 0.1\n  nope: 3\n")
    with pytest.raises(DistilleryError, match="'train.nope' is not a known setting"):
        load_config(unknown)


def test_every_field_documented_or_obvious():
    # Every section is a closed set: extra keys are forbidden everywhere.
    for section in RunConfig.model_fields.values():
        model = section.annotation
        assert model.model_config.get("extra") == "forbid"


def test_loss_chunk_size_auto_picks_rows_per_device():
    from distillery.config import LossConfig

    auto = LossConfig()
    assert auto.chunk_size == "auto"
    assert auto.chunk_rows("cpu", 49152) == 64    # 5 x 64 x 49152 x 4 bytes ~ 64 MiB
    assert auto.chunk_rows("cpu", 512) == 256     # at most 256
    assert auto.chunk_rows("cpu", 151936) == 32   # at least 32
    assert auto.chunk_rows("cuda", 49152) == 1024  # 5 x 1024 x 49152 x 4 bytes ~ 1 GiB
    assert auto.chunk_rows("cuda", 151936) == 256  # never below 256
    assert LossConfig(chunk_size=40).chunk_rows("cuda", 49152) == 40
    with pytest.raises(ValueError):
        LossConfig(chunk_size=0)


def test_every_setting_has_a_description():
    from pydantic import BaseModel

    from distillery.config import RunConfig

    missing = []

    def walk(model, prefix):
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
            elif not field.description:
                missing.append(prefix + name)

    walk(RunConfig, "")
    assert missing == []


def test_cache_and_eval_sections_do_not_change_a_runs_identity():
    from distillery.run_folder import run_fingerprint
    from distillery.config import RunConfig

    a = RunConfig()
    b = RunConfig.model_validate({"cache": {"k": 64, "batch_size": 2}, "eval": {"seq_len": 128}})
    assert run_fingerprint(a) == run_fingerprint(b)
    assert run_fingerprint(a) != run_fingerprint(RunConfig.model_validate({"loss": {"kd": "jsd"}}))


def test_return_large_frees_is_auto_by_default_and_takes_booleans():
    from distillery.config import TrainConfig

    assert TrainConfig().return_large_frees == "auto"  # train.py: on exactly when the run has on-policy steps
    assert TrainConfig(return_large_frees=False).return_large_frees is False
    with pytest.raises(ValueError):
        TrainConfig(return_large_frees="sometimes")
