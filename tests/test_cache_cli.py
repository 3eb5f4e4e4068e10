"""``distillery cache RECIPE``: a tiny teacher folder and corpus end to end, then read back as a CachedTeacher."""

from __future__ import annotations

import json

import pytest
import torch

from distillery.teachers import CachedTeacher
from distillery.cli import main
from distillery.config import load_config
from distillery.data import build_datasets, collate, tokenizer_hash
from distillery.errors import DistilleryError
from distillery.targets import sparse_from_logits
from helpers_run import write_recipe


def test_cache_verb_end_to_end(tmp_path, capsys):
    recipe = write_recipe(tmp_path, tmp_path / "run", data={"max_train_blocks": 12, "max_val_blocks": 3})
    out = tmp_path / "cache"
    assert main(["cache", str(recipe), "--out", str(out), "--k", "8", "--batch-size", "4",
                 "--shard-blocks", "5", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["complete"] and summary["tokens_written"] == 15 * 32

    cfg = load_config(recipe)
    teacher = CachedTeacher(out)
    tok = teacher.tokenizer  # saved with the cache
    splits = build_datasets(cfg.data, tok, progress=False)
    teacher.check(splits.fingerprint, cfg)
    manifest = teacher.reader.manifest
    assert manifest["tokenizer_hash"] == tokenizer_hash(tok) and manifest["teacher"]["name"] == "teacher"
    assert len(manifest["teacher"]["weights_hash"]) == 64 and manifest["k"] == 8

    batch = collate([splits.train[i] for i in (11, 2, 6)])
    got = teacher.targets(batch)
    from distillery.teachers import load_teacher

    live = load_teacher(cfg.teacher.source, device="cpu")
    with torch.no_grad():
        ref = sparse_from_logits(live.model(input_ids=batch["input_ids"]).logits, 8, cfg.loss.loss_temperature)
    assert torch.equal(got.topk_ids[got.mask], ref.topk_ids[got.mask])
    assert teacher.eval_teacher().targets(collate([splits.val[0]])).shape == (1, 32)

    other = load_config(recipe, ["data.seq_len=16"])
    with pytest.raises(DistilleryError, match="seq_len"):
        teacher.check(build_datasets(other.data, tok, progress=False).fingerprint, other)

    assert main(["cache", "--info", str(out)]) == 0
    assert "complete (4/4 shards committed)" in capsys.readouterr().out  # train 12 blocks / 5 -> 3, val 3 -> 1
