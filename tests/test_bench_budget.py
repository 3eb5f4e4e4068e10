"""benchmarks/budget_levers.py's arm specs, and the demo-folder helpers the lever scripts share (benchmarks/common.py)."""

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import budget_levers  # noqa: E402
import common  # noqa: E402


def test_arm_specs_take_overrides_and_their_own_seeds():
    assert budget_levers.parse_arm("a=train.max_steps=140", [0]) == ("a", ["train.max_steps=140"], [0])
    assert budget_levers.parse_arm("b@0,1=train.max_steps=280;train.micro_batch_size=2;", [5]) == (
        "b", ["train.max_steps=280", "train.micro_batch_size=2"], [0, 1])
    for bad in ("noeq", "=x=1", "c=", "d@=x=1"):
        with pytest.raises(SystemExit, match="--arm"):
            budget_levers.parse_arm(bad, [0])


def test_demo_folder_arguments_and_result(tmp_path: Path):
    ap = argparse.ArgumentParser()
    common.demo_folder_args(ap, "some_levers")
    args = ap.parse_args(["--demo-dir", str(tmp_path / "demo"), "--work-dir", str(tmp_path / "w"), "--threads", "1"])
    assert args.out == "benchmarks/results/some_levers.json"
    demo, work, machine = common.open_demo_folder(args)
    assert work.is_dir() and demo == (tmp_path / "demo").resolve() and machine["threads"] == 1
    common.write_demo_result("some_levers", machine, demo, tmp_path / "r.json", rows=[1])
    out = json.loads((tmp_path / "r.json").read_text())
    assert out["benchmark"] == "some_levers" and out["rows"] == [1] and "load_average_end" in out["machine"]
