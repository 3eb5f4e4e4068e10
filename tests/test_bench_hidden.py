"""benchmarks/hidden_state_kd.py reads a pruned student's kept layers and channels off the weights alone."""

import sys
from pathlib import Path

import pytest
import torch

from distillery.prune import prune_model
from tiny import tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import hidden_state_kd  # noqa: E402


def test_pruned_map_recovers_kept_layers_and_channels():
    teacher = tiny_llama(layers=6, hidden=64, heads=8, kv_heads=4, ffn=128)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained norms differ per layer (a fresh model's are all ones: no layer could be told apart)
        for p in teacher.parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
    ids = torch.randint(4, 512, (3, 24), generator=g)
    student = prune_model(teacher, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], layers=3, hidden=40)
    ch, kept = hidden_state_kd.pruned_map(student, teacher)
    plan = student.prune_plan
    assert kept == plan["layers"] and len(ch) == 40
    assert torch.equal(teacher.get_input_embeddings().weight[:, ch], student.get_input_embeddings().weight)
    other = tiny_llama(layers=3, hidden=40, heads=4, kv_heads=2, ffn=128, seed=5)  # not cut from this teacher
    with pytest.raises(SystemExit, match="not pruned from it"):
        hidden_state_kd.pruned_map(other, teacher)
