"""The Python API: the README's example runs as written (on a tiny teacher), overrides merge and fail like the
CLI's, `import distillery` stays light, and the CLI's distill names where the student went."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import distillery
from distillery.errors import DistilleryError
from helpers_run import make_corpus, make_teacher, run_metrics, write_recipe

ROOT = Path(__file__).resolve().parents[1]


def readme_python_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    """The block is executed unchanged in a folder where configs/smollm2_student.yaml is a tiny recipe (a 2-layer
    random teacher instead of SmolLM2, so that it runs in seconds); every printed value is then checked."""
    pytest.importorskip("onnxruntime")
    recipe = yaml.safe_load(write_recipe(tmp_path, tmp_path / "unused").read_text())
    recipe["train"].pop("output_dir")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "smollm2_student.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_python_block(), "README.md", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    run = tmp_path / "runs" / "notebook"
    assert lines[0] == str(Path("runs/notebook/student"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 40 and lines[1] == str(summary["validation"])
    kl, top1 = re.fullmatch(r"KL\(T\|\|S\) ([\d.]+), top-1 agreement ([\d.]+)", lines[2]).groups()
    assert 0 < float(kl) < 10 and 0 < float(top1) <= 1
    assert lines[3] == "True" and (run / "onnx").is_dir()
    assert [m["step"] for m in run_metrics(run) if "loss" in m] == list(range(1, 41))
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(run / "student").config.num_hidden_layers == 1


def test_configure_merges_like_the_cli(tmp_path):
    recipe = write_recipe(tmp_path, tmp_path / "out")
    cli = distillery.load_config(recipe, ["train.max_steps=9", "loss.kd=jsd", "loss.beta=0.25"])
    py = distillery.configure(recipe, train={"max_steps": 9}, **{"loss.kd": "jsd", "loss.beta": 0.25})
    assert py == cli
    assert py.train.micro_batch_size == 4 and py.train.lr == 3e-3  # the rest of the section is kept
    from_cfg = distillery.configure(cli, train={"lr": 1e-4})
    assert from_cfg.train.lr == 1e-4 and from_cfg.train.max_steps == 9 and from_cfg.loss.kd == "jsd"
    assert cli.train.lr == 3e-3  # the given config is not changed
    # only what was set stays set: a default teacher.source is not turned into an explicit one
    assert "source" not in distillery.configure(None, train={"max_steps": 3}).teacher.model_fields_set


@pytest.mark.parametrize("overrides, message", [
    ({"train": {"max_stepz": 3}}, "config key 'train.max_stepz' is not a known setting (did you mean 'train.max_steps'?)"),
    ({"train.max_steps": -1}, "config key 'train.max_steps': Input should be greater than 0 (got -1)"),
    ({"max_steps": 3}, "override 'max_steps' is neither a section"),
    ({"train.max_steps.x": 3}, "override 'train.max_steps.x': 'max_steps' is not a section"),
])
def test_configure_errors_name_the_key(tmp_path, overrides, message):
    recipe = write_recipe(tmp_path, tmp_path / "out")
    with pytest.raises(DistilleryError) as err:
        distillery.configure(recipe, **overrides)
    assert message in str(err.value)


def test_distill_returns_paths_and_evaluate_takes_a_folder(tmp_path):
    cfg = {"teacher": {"source": str(make_teacher(tmp_path))},
           "student": {"model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                 "num_attention_heads": 2, "num_key_value_heads": 1}},
           "data": {"train": [str(make_corpus(tmp_path))], "seq_len": 32, "val_fraction": 0.1},
           "train": {"output_dir": str(tmp_path / "run"), "max_steps": 3, "micro_batch_size": 4, "progress": False}}
    result = distillery.distill(cfg)
    assert isinstance(result, distillery.RunResult)
    assert result.output_dir == tmp_path / "run" and result.student_dir == tmp_path / "run" / "student"
    assert result.metrics_path == tmp_path / "run" / "metrics.jsonl" and result.metrics_path.is_file()
    assert result.summary == json.loads((tmp_path / "run" / "summary.json").read_text())
    assert result.config.train.max_steps == 3
    by_folder = distillery.evaluate(str(result.student_dir), data=str(make_corpus(tmp_path)),
                                    teacher=str(make_teacher(tmp_path)), seq_len=32, max_blocks=4)
    by_result = distillery.evaluate(result, data=[make_corpus(tmp_path)], seq_len=32, max_blocks=4)
    assert by_folder["tokens"] == by_result["tokens"] == 4 * 32
    assert by_folder["kl_teacher_student"] == pytest.approx(by_result["kl_teacher_student"], rel=1e-6)


def test_api_names_survive_submodule_imports():
    """`distillery.evaluate` and `distillery.export` stay the functions after their submodules are imported."""
    import distillery.evaluate  # noqa: F401  (the submodule: sets the package attribute, which is refused)
    import distillery.export  # noqa: F401
    from distillery.evaluate import run_eval

    assert callable(distillery.evaluate) and distillery.evaluate.__module__ == "distillery.python_api"
    assert distillery.export.__module__ == "distillery.python_api"
    assert run_eval.__module__ == "distillery.evaluate"
    assert sys.modules["distillery.evaluate"].run_eval is run_eval
    assert distillery.load_teacher.__module__ == "distillery.teachers.hf"
    assert distillery.open_teacher.__module__ == "distillery.teachers.open"
    assert set(distillery.__all__) <= set(dir(distillery))
    with pytest.raises(AttributeError):
        distillery.no_such_name


def test_import_is_light():
    code = "import sys, distillery; print(sorted(m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cli_distill_says_where_the_student_is(tmp_path, capsys):
    from distillery.cli import main

    recipe = write_recipe(tmp_path, tmp_path / "out", train={"max_steps": 2, "eval_every": 0})
    assert main(["distill", str(recipe)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["steps"] == 2
    assert err.strip().splitlines()[-1] == (f"student saved to {tmp_path / 'out' / 'student'} "
                                            f"(metrics: {tmp_path / 'out' / 'metrics.jsonl'})")
