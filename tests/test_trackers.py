"""train.report_to: Accelerate's trackers get the records metrics.jsonl gets. TensorBoard's event files are read
back (TFRecord framing + the Event protobuf) and compared value by value with metrics.jsonl."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from distillery.config import load_config
from distillery.errors import DistilleryError
from distillery.trackers import hparams
from distillery.train import distill
from helpers_run import run_metrics, write_recipe


def event_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from every TensorBoard event file under ``folder``."""
    try:
        from tensorboardX.proto.event_pb2 import Event
    except ImportError:
        from tensorboard.compat.proto.event_pb2 import Event
    out: dict[str, dict[int, float]] = {}
    files = sorted(folder.rglob("events.out.tfevents.*"))
    assert files, f"no event file under {folder}"
    for f in files:
        data, pos = f.read_bytes(), 0
        while pos < len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out


def test_tensorboard_gets_every_record(tmp_path):
    out = tmp_path / "run"
    cfg = load_config(write_recipe(tmp_path, out), ["train.report_to=[tensorboard]", "train.max_steps=4",
                                                    "train.eval_every=2", "train.save_every=0"])
    distill(cfg)
    scalars = event_scalars(out / "logs" / "distillery")
    records = run_metrics(out)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if r.get("split") == "val"]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["step"] for r in val] == [2, 4]
    for key in ("loss", "kd", "ce", "lr", "grad_norm", "tokens_seen", "tok_s"):
        assert scalars[f"train/{key}"] == pytest.approx({r["step"]: r[key] for r in train}, rel=1e-6), key
    for key in ("kl_teacher_student", "top1_agreement", "student_perplexity", "tokens"):
        assert scalars[f"val/{key}"] == pytest.approx({r["step"]: r[key] for r in val}, rel=1e-6), key
    assert not any(tag.endswith("/step") or tag.endswith("/split") for tag in scalars)


def test_tensorboard_alias_and_a_single_name():
    assert load_config(None, ["train.tensorboard=true"]).train.report_to == ["tensorboard"]
    assert load_config(None, ["train.report_to=[wandb]", "train.tensorboard=true"]).train.report_to == ["wandb", "tensorboard"]
    assert load_config(None, ["train.report_to=mlflow"]).train.report_to == ["mlflow"]
    assert load_config(None).train.report_to == []


def test_unknown_tracker_names_the_choices():
    with pytest.raises(DistilleryError, match=r"config key 'train.report_to.0': Input should be 'tensorboard', 'wandb'"):
        load_config(None, ["train.report_to=[tensorbored]"])


def test_missing_package_is_one_line_before_the_teacher_loads(tmp_path):
    from accelerate.tracking import get_available_trackers

    absent = next((n for n in ("aim", "swanlab", "dvclive", "clearml") if n not in map(str, get_available_trackers())), None)
    if absent is None:
        pytest.skip("every tracker package is installed here")
    cfg = load_config(write_recipe(tmp_path, tmp_path / "run"), [f"train.report_to=[{absent}]"])
    with pytest.raises(DistilleryError) as err:
        distill(cfg)
    assert str(err.value) == (f"train.report_to names {absent}, but its package is not installed (pip install {absent}); "
                              "or remove it from train.report_to")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_hparams_are_flat_scalars():
    flat = hparams(load_config(None, ["loss.kd=jsd"]).model_dump(mode="json"))
    assert flat["loss.kd"] == "jsd" and flat["train.max_steps"] == 200 and flat["data.train"] == "['demo:shakespeare']"
    assert flat["teacher.cache_path"] == "None"
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
