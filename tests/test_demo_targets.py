"""The demo's teacher targets: written once by ``distillery cache`` into the teacher's cache folder, keyed by the data
it holds, reused by the next demo without the teacher, and read back by a KD run on the demo's chat + plain files."""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import torch
from tiny import tiny_llama, tiny_tokenizer

from distillery.config import load_config
from distillery.demo import make_targets, targets_folder
from distillery.demo_chat import write_chat, write_plain
from rich.console import Console
from distillery.teachers import CachedTeacher, load_teacher
from distillery.train import distill


def _sharp_teacher():
    """A tiny Llama with peaked next-token distributions (head x 40: entropy ~1 nat, KL between neighbouring positions
    ~16 nats), so targets read for the wrong positions cannot pass for the right ones."""
    model = tiny_llama(seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    return model


def _setup(tmp_path: Path):
    tok = tiny_tokenizer()
    teacher = tmp_path / "teacher"
    _sharp_teacher().save_pretrained(teacher)
    tok.save_pretrained(teacher)
    data = tmp_path / "data"
    data.mkdir()
    prompts = [f"Say something about line {i}." for i in range(6)]
    write_chat(data / "train_chat.jsonl", prompts, [f"Line {i} is a line of verse, and a good one." for i in range(6)],
               "You are a helpful assistant.")
    write_chat(data / "heldout_chat.jsonl", prompts[:2], ["It is.", "It is not."], "You are a helpful assistant.")
    write_plain(data / "plain.txt", 3000)
    return teacher, data


def _cfg(teacher: Path, data: Path, out: Path, cache_path: str, extra: list[str] | None = None):
    recipe = resources.files("distillery") / "configs" / "demo.yaml"
    return load_config(str(recipe), [f"teacher.source={teacher}", "teacher.kind=cache", f"teacher.cache_path={cache_path}",
                                     "teacher.dtype=float32", "student.init=pretrained", f"student.pretrained={teacher}",
                                     f"data.train={json.dumps([str(data / 'train_chat.jsonl'), str(data / 'plain.txt')])}",
                                     f"data.validation={json.dumps([str(data / 'heldout_chat.jsonl')])}",
                                     "data.seq_len=128", "train.max_steps=2", "train.micro_batch_size=2",
                                     "train.warmup_steps=0", "train.lr=1e-9", "train.save_every=0", "train.progress=false",
                                     f"train.output_dir={out}"] + (extra or []))


def test_targets_keyed_by_content_written_once_and_trained_from(tmp_path: Path):
    teacher, data = _setup(tmp_path)
    cache = tmp_path / "home" / "demo" / "tiny"
    cfg = _cfg(teacher, data, tmp_path / "kd", "placeholder")
    folder = targets_folder(cache, cfg)
    assert folder.parent == cache and folder.name.startswith("targets-")
    moved = tmp_path / "elsewhere"  # the same bytes under another output folder: the same targets
    shutil.copytree(data, moved)
    assert targets_folder(cache, _cfg(teacher, moved, tmp_path / "kd2", "p")) == folder
    assert targets_folder(cache, _cfg(teacher, data, tmp_path / "kd", "p", ["data.seq_len=32"])) != folder
    # data.weights only reorder the blocks: the demo's conversation weight reads the same targets
    assert targets_folder(cache, _cfg(teacher, data, tmp_path / "kd", "p", ["data.weights.chat=3"])) == folder
    changed = tmp_path / "changed"
    shutil.copytree(data, changed)
    (changed / "plain.txt").write_text("Other text entirely.\n" * 50)
    assert targets_folder(cache, _cfg(teacher, changed, tmp_path / "kd3", "p")) != folder

    cfg.teacher.cache_path = str(folder)
    first = make_targets(cfg, Console(quiet=True))
    assert not first["reused"] and first["k_top"] == 16 and first["tail_samples"] == 16 and first["blocks"] > 0
    reader = CachedTeacher(folder).reader
    assert reader.manifest["complete"] and set(reader.splits) == {"train", "val"}

    # the cached targets are the teacher's: top-1 of the cache = argmax of the live teacher's logits
    from distillery.data import build_datasets, collate

    live = load_teacher(str(teacher), device="cpu", dtype="float32")
    splits = build_datasets(cfg.data, live.tokenizer, progress=False)
    batch = collate([splits.train[0]])
    got = CachedTeacher(folder).targets(batch)
    with torch.no_grad():
        argmax = live.model(input_ids=batch["input_ids"]).logits.argmax(-1)
    assert torch.equal(got.topk_ids[..., 0][got.mask], argmax[got.mask])

    (teacher / "model.safetensors").unlink()  # the next demo needs no teacher for its targets
    second = make_targets(cfg, Console(quiet=True))
    assert second["reused"] and second["blocks"] == first["blocks"]

    # A KD run reads them on the chat + plain blocks. Its student is the teacher itself, so forward KL to aligned
    # targets is ~0 (the 16 tail draws make the estimate noisy, not biased; lr 1e-9 keeps the student the teacher);
    # shifted by one position it would be ~16.
    # The run reads the data from the other folder (another demo's): same bytes, so the same targets serve it.
    _sharp_teacher().save_pretrained(teacher)
    distill(_cfg(teacher, moved, tmp_path / "kd", str(folder)))
    rows = [json.loads(ln) for ln in (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "kd" in r and "split" not in r]
    assert len(steps) == 2 and all(abs(r["kd"]) < 0.02 and r["ce"] > 1 for r in steps)
