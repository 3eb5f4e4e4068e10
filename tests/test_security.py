"""Security: no pickle from user paths, no model code unless the recipe allows it, keys never written,
writes only where the user said.

* a source scan: every ``torch.load`` passes ``weights_only=True``; no ``pickle``/``marshal`` loads,
  ``allow_pickle=True``, unsafe ``yaml.load``, ``eval``/``exec``, or a literal ``trust_remote_code=True``;
* a checkpoint whose ``optimizer.pt`` is a malicious pickle is refused with one line, its payload never runs;
* a teacher folder with its own model code (``auto_map``) is refused while ``teacher.trust_remote_code``
  is off (the default), and its code runs only once the recipe turns it on;
* a pasted API key is refused as ``api_key_env`` without being echoed;
* ``distill`` run with HOME, TMPDIR, the Hugging Face cache and the working directory in a sandbox
  writes nothing but its output folder.
"""

from __future__ import annotations

import ast
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distillery.cli import main
from distillery.config import TeacherConfig
from helpers_run import make_teacher, write_recipe

SRC = Path(__file__).resolve().parents[1] / "src" / "distillery"
TRAIN = {"max_steps": 1, "save_every": 1, "eval_every": 0, "eval_batches": 1}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = getattr(f.value, "id", "") if isinstance(f, ast.Attribute) else ""
            yield node, owner, name


def test_source_has_no_unsafe_deserialisation_or_code_execution():
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node, owner, name in _calls(tree):
            kw = {k.arg: k.value for k in node.keywords}
            where = f"{path.relative_to(SRC)}:{node.lineno}"
            literal = lambda k: isinstance(kw.get(k), ast.Constant) and kw[k].value  # noqa: E731
            if owner == "torch" and name == "load" and literal("weights_only") is not True:
                problems.append(f"{where}: torch.load without weights_only=True")
            if owner in ("pickle", "marshal", "dill", "joblib") and name in ("load", "loads"):
                problems.append(f"{where}: {owner}.{name}")
            if name == "load" and literal("allow_pickle"):
                problems.append(f"{where}: allow_pickle=True")
            if owner == "yaml" and name in ("load", "unsafe_load", "full_load"):
                problems.append(f"{where}: yaml.{name} (use safe_load)")
            if isinstance(node.func, ast.Name) and name in ("eval", "exec"):
                problems.append(f"{where}: builtin {name}")
            if literal("trust_remote_code") is True:
                problems.append(f"{where}: trust_remote_code=True")
    assert not problems, problems
    assert TeacherConfig().trust_remote_code is False


class _Payload:
    """Unpickling this would create ``marker`` (what a real attack would do is worse)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_payload_in_a_checkpoint_is_refused_and_never_runs(tmp_path, capsys):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path, out, train=TRAIN)
    assert main(["distill", str(recipe)]) == 0
    marker = tmp_path / "PAYLOAD_RAN"
    ckpt = out / "checkpoints" / "step-00000001"
    (ckpt / "optimizer.pt").write_bytes(pickle.dumps({"state": {}, "param_groups": [], "x": _Payload(marker)}, protocol=2))
    capsys.readouterr()
    assert main(["distill", str(recipe), "--resume", "train.max_steps=2"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "optimizer.pt is not a plain tensor file" in err[0] and "refusing to unpickle" in err[0]
    assert not marker.exists()


def _custom_code_teacher(root: Path, marker: Path) -> Path:
    folder = root / "custom-code-teacher"
    folder.mkdir()
    for f in make_teacher(root).glob("tokenizer*"):
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "config.json").write_text('{"model_type": "custom", "auto_map": {"AutoConfig": "custom.C", '
                                        '"AutoModelForCausalLM": "custom.M"}}')
    (folder / "custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                      "from transformers import PretrainedConfig, PreTrainedModel\n"
                                      "class C(PretrainedConfig):\n    model_type = 'custom'\n"
                                      "class M(PreTrainedModel):\n    config_class = C\n")
    return folder


def test_model_code_in_a_teacher_folder_runs_only_when_the_recipe_allows_it(tmp_path, capsys):
    marker = tmp_path / "MODEL_CODE_RAN"
    teacher = _custom_code_teacher(tmp_path, marker)
    recipe = write_recipe(tmp_path, tmp_path / "run", teacher={"source": str(teacher)}, train=TRAIN)
    assert main(["distill", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "ships its own model code" in err and "teacher.trust_remote_code: true" in err
    assert not marker.exists()
    main(["distill", str(recipe), "teacher.trust_remote_code=true"])  # fails later (not a real model): irrelevant
    assert marker.exists()  # the switch, and only the switch, lets the folder's code run


def test_a_pasted_api_key_is_refused_without_being_echoed(tmp_path, capsys):
    key = "sk-proj-" + "A1b2C3d4" * 6
    recipe = tmp_path / "api.yaml"
    recipe.write_text(yaml.safe_dump({"api": {"base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": key,
                                              "prompts": [str(tmp_path / "p.jsonl")], "output": str(tmp_path / "o.jsonl")}}))
    assert main(["generate", str(recipe), "--quiet"]) == 2
    captured = capsys.readouterr()
    assert "api_key_env" in captured.err and key not in captured.err + captured.out and key[8:20] not in captured.err
    assert not (tmp_path / "o.jsonl").exists()


def test_distill_writes_only_into_its_output_folder(tmp_path):
    inputs, sandbox = tmp_path / "inputs", tmp_path / "sandbox"
    inputs.mkdir()
    recipe = write_recipe(inputs, sandbox / "out", train={**TRAIN, "max_steps": 2, "eval_every": 1})
    dirs = {name: sandbox / name for name in ("home", "tmp", "cwd", "hf", "distillery-home")}
    for d in dirs.values():
        d.mkdir(parents=True)
    env = {**os.environ, "HOME": str(dirs["home"]), "TMPDIR": str(dirs["tmp"]), "HF_HOME": str(dirs["hf"]),
           "DISTILLERY_HOME": str(dirs["distillery-home"]), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(sys.path), "PYTHONDONTWRITEBYTECODE": "1"}
    before = {p for p in inputs.rglob("*")}
    proc = subprocess.run([sys.executable, "-m", "distillery.cli", "distill", str(recipe)], cwd=dirs["cwd"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    outside = [str(p.relative_to(sandbox)) for p in sandbox.rglob("*") if p.is_file() and "out" not in p.relative_to(sandbox).parts[:1]]
    assert not outside, f"written outside train.output_dir: {outside}"
    assert {p for p in inputs.rglob("*")} == before  # inputs untouched, nothing added beside them
    assert (sandbox / "out" / "student" / "model.safetensors").is_file()
