"""Shared set-up for loop-level tests: a tiny teacher folder, a small corpus, a recipe writer."""

from __future__ import annotations

from pathlib import Path

import yaml

from tiny import corpus_text, tiny_llama, tiny_tokenizer


def make_teacher(root: Path, seed: int = 1, vocab: int = 512) -> Path:
    d = root / "teacher"
    if not (d / "config.json").exists():
        tiny_llama(vocab_size=vocab, hidden=64, layers=2, seed=seed).save_pretrained(d)
        tiny_tokenizer(vocab).save_pretrained(d)
    return d


def make_corpus(root: Path, chars: int = 60_000) -> Path:
    p = root / "corpus.txt"
    if not p.exists():
        p.write_text(corpus_text(chars))
    return p


def write_recipe(root: Path, output_dir: Path, **sections) -> Path:
    recipe = {
        "teacher": {"source": str(make_teacher(root))},
        "student": {"model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                              "num_attention_heads": 2, "num_key_value_heads": 1}},
        "data": {"train": [str(make_corpus(root))], "seq_len": 32, "val_fraction": 0.1},
        "loss": {"kd": "forward_kl", "chunk_size": 40},
        "train": {"output_dir": str(output_dir), "max_steps": 6, "micro_batch_size": 4, "lr": 3e-3,
                  "warmup_steps": 2, "eval_every": 3, "eval_batches": 2, "save_every": 3, "progress": False},
    }
    for sec, values in sections.items():
        recipe.setdefault(sec, {}).update(values)
    p = root / f"recipe-{output_dir.name}.yaml"
    p.write_text(yaml.safe_dump(recipe))
    return p


def run_metrics(run: Path) -> list[dict]:
    import json
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def student_weights(run: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(run / "student" / "model.safetensors"))


def launch_two(config: Path, recipe: Path, *args: str):
    """``distillery distill`` under ``accelerate launch --config_file config`` (two processes on this CPU)."""
    import os
    import subprocess
    import sys

    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([str(accelerate), "launch", "--config_file", str(config), "--main_process_port", "0",
                           "-m", "distillery.cli", "distill", str(recipe), *args],
                          capture_output=True, text=True, env=env, timeout=600)


def assert_same_training(a_dir: Path, b_dir: Path, steps: list[int], rel: float = 1e-5) -> None:
    """Two runs logged the same steps, losses and gradient norms (relative ``rel``, absolute 1e-6 for a small
    KD term), tokens and learning rates, and ended with weights equal to 1e-5; prints the worst differences."""
    import pytest
    import torch

    a = [m for m in run_metrics(a_dir) if "loss" in m]
    b = [m for m in run_metrics(b_dir) if "loss" in m]
    assert [m["step"] for m in a] == [m["step"] for m in b] == steps
    for x, y in zip(a, b):
        for key in ("loss", "kd", "ce", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=rel, abs=1e-6), (x["step"], key, x[key], y[key])
        assert x["tokens_seen"] == y["tokens_seen"] and x["lr"] == y["lr"]
    wa, wb = student_weights(a_dir), student_weights(b_dir)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5)
    worst = {key: max(abs(x[key] - y[key]) / abs(y[key]) for x, y in zip(a, b)) for key in ("loss", "kd", "ce", "grad_norm")}
    print(f"{a_dir.name} vs {b_dir.name}: max relative difference per step "
          f"{ {k: f'{v:.2g}' for k, v in worst.items()} }; max |weight difference| "
          f"{max(float((wa[k] - wb[k]).abs().max()) for k in wa):.2g}")
