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
