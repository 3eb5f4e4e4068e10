"""How the demo's teacher writes its training answers (``--answer-temperature``, ``--answer-top-p``), on a tiny model:
greedy and sampled answers live in separate cache files, sampled ones are reproducible from their seed, the held-out
reference answers stay greedy, and a demo folder is claimed for one decoding only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from tiny import tiny_llama, tiny_tokenizer

from distillery.demo import TRAIN_ANSWERS, _claim, demo_marker, make_data, train_answer_settings
from distillery.demo_chat import teacher_answers, teacher_cache
from distillery.errors import DistilleryError
from distillery.teachers.hf import HFTeacher

S = dict(train_prompts=6, heldout_prompts=2, answer_tokens=6, plain_chars=200, gen_batch=4)


@pytest.fixture(scope="module")
def teacher():
    return HFTeacher(model=tiny_llama(seed=4), tokenizer=tiny_tokenizer(), name="tiny/t", source="t",
                     device=torch.device("cpu"))


def _data(teacher, out: Path, answers: dict, seed: int = 0) -> dict:
    return make_data(teacher, out, S, Console(quiet=True), seed=seed, answers=answers)


def test_answer_settings_default_and_bad_values():
    assert TRAIN_ANSWERS["sample_temperature"] == 0.0 and train_answer_settings() == {}  # default: greedy
    assert train_answer_settings(0.0, 0.5) == {}  # greedy ignores top-p: one greedy cache, one marker
    assert train_answer_settings(0.7, 0.9) == {"sample_temperature": 0.7, "top_p": 0.9}
    assert train_answer_settings(0.7) == {"sample_temperature": 0.7, "top_p": TRAIN_ANSWERS["top_p"]}
    for t, p in ((-0.1, 1.0), (0.7, 0.0), (0.7, 1.5), (float("nan"), 1.0)):
        with pytest.raises(DistilleryError, match="--answer-temperature must be >= 0"):
            train_answer_settings(t, p)
    with pytest.raises(DistilleryError, match="top_p in"):
        teacher_answers(None, None, ["x"], "unused.jsonl", sample_temperature=1.0, top_p=0.0)


def test_sampled_training_answers_cached_apart_and_reproducible(teacher, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("DISTILLERY_HOME", str(tmp_path / "home"))
    cache = teacher_cache(teacher)
    greedy = _data(teacher, tmp_path / "g", {})
    sampled = _data(teacher, tmp_path / "s", train_answer_settings(0.7, 0.9))
    g, d = greedy["train_decoding"], sampled["train_decoding"]
    assert set(g) == {"decoding", "distinct_2", "repeat_share"} and g["decoding"] == "greedy"
    assert d["decoding"] == "sampled" and (d["sample_temperature"], d["top_p"], d["seed"]) == (0.7, 0.9, 0)
    assert greedy["train_answers"] == teacher_answers(teacher.model, teacher.tokenizer, greedy["train_prompts"],
                                                      tmp_path / "direct.jsonl", max_new_tokens=6, batch_size=4)
    # the same prompts, other training answers; the held-out reference answers are the same greedy ones
    assert sampled["train_prompts"] == greedy["train_prompts"] and sampled["train_answers"] != greedy["train_answers"]
    assert sampled["heldout_greedy"] == greedy["heldout_greedy"] and sampled["heldout_sampled"] == greedy["heldout_sampled"]
    assert len(sorted(cache.glob("answers_train-*.jsonl"))) == 2  # greedy and sampled never share a file
    assert len(sorted(cache.glob("answers_heldout_greedy-*.jsonl"))) == 1
    chat = Path(sampled["train_chat"]).read_text()
    assert all(json.dumps(a)[1:-1] in chat for a in sampled["train_answers"] if a.strip())  # what the students read

    # a second demo reads the cache; with the cache gone the same seed draws the same answers again
    assert _data(teacher, tmp_path / "s2", train_answer_settings(0.7, 0.9))["answers_were_cached"] is True
    for f in cache.glob("answers_train-*.jsonl"):
        f.unlink()
    again = _data(teacher, tmp_path / "s3", train_answer_settings(0.7, 0.9))
    assert again["answers_were_cached"] is False
    assert again["train_answers"] == sampled["train_answers"]
    other_seed = _data(teacher, tmp_path / "s4", train_answer_settings(0.7, 0.9), seed=1)
    assert other_seed["train_prompts"] != sampled["train_prompts"]  # the seed draws the prompts too


def test_top_p_reaches_the_sampler(teacher, tmp_path: Path):
    """A nucleus of (almost) zero mass keeps only the most likely token: whatever the temperature, that is greedy."""
    tok, model = teacher.tokenizer, teacher.model
    prompts = ["Who is there?", "Long live the king.", "Speak, speak!"]
    kw = dict(max_new_tokens=8, batch_size=2, log=lambda m: None)
    greedy = teacher_answers(model, tok, prompts, tmp_path / "g.jsonl", **kw)
    hot = teacher_answers(model, tok, prompts, tmp_path / "h.jsonl", sample_temperature=5.0, top_p=1e-6, seed=3, **kw)
    assert hot == greedy
    full = teacher_answers(model, tok, prompts, tmp_path / "f.jsonl", sample_temperature=5.0, seed=3, **kw)
    assert full != greedy  # at T = 5 with the whole distribution the random tiny model wanders off the argmax


def test_demo_folder_claimed_for_one_decoding(tmp_path: Path):
    s = {"steps": 12}
    greedy, sampled = demo_marker(s, [], {}), demo_marker(s, [], train_answer_settings(0.7, 0.9))
    assert "train_answers" not in greedy  # as before the setting existed: earlier greedy demo folders are reused
    assert sampled["train_answers"] == {"sample_temperature": 0.7, "top_p": 0.9}
    _claim(tmp_path / "d", greedy)
    (tmp_path / "d" / "kd").mkdir()
    _claim(tmp_path / "d", demo_marker(s, [], {}))
    assert _claim(tmp_path / "d", sampled) == tmp_path / "d.prev-1"  # students trained on greedy answers are not
    assert not (tmp_path / "d" / "kd").exists()                       # the sampled demo's: moved aside


def test_run_overrides_split_by_prefix():
    """``kd:key=value`` / ``ce:key=value`` reach one run, plain ones both; a value holding a colon stays whole."""
    from distillery.demo import run_overrides

    given = ["train.lr=1e-3", "kd:generation.on_policy_fraction=0.5", "ce:train.lr=3e-3",
             "data.train=[\"a:b.jsonl\"]"]
    assert run_overrides(given, "kd") == ["train.lr=1e-3", "generation.on_policy_fraction=0.5",
                                          "data.train=[\"a:b.jsonl\"]"]
    assert run_overrides(given, "ce") == ["train.lr=1e-3", "train.lr=3e-3", "data.train=[\"a:b.jsonl\"]"]
    assert run_overrides(None, "kd") == []


def test_demo_settings_take_prompt_and_plain_text_counts():
    from distillery.demo import SETTINGS, demo_settings

    assert demo_settings(False) == SETTINGS["full"] and demo_settings(True) == SETTINGS["quick"]
    s = demo_settings(False, train_prompts=400, plain_chars=0)
    assert s["train_prompts"] == 400 and s["plain_chars"] == 0 and SETTINGS["full"]["train_prompts"] == 200
    with pytest.raises(DistilleryError, match="--train-prompts must be at least 1"):
        demo_settings(False, train_prompts=0)
    with pytest.raises(DistilleryError, match="--plain-chars must be >= 0"):
        demo_settings(True, plain_chars=-1)


def test_pruned_init_records_what_it_kept(teacher, tmp_path: Path, monkeypatch):
    import distillery.demo as demo

    monkeypatch.setattr(demo, "PRUNE", {"layers": 1, "hidden": 16, "ffn": 32, "heads": 2})
    data = _data(teacher, tmp_path / "out", train_answer_settings())
    folder = demo.make_student(teacher, data, tmp_path / "out", dict(S, micro_batch=2, calib_batches=1),
                               Console(quiet=True))
    plan = json.loads((folder / "pruning.json").read_text())
    assert plan["student_parameters"] < plan["teacher_parameters"] and len(plan["layers"]) == 1
    assert (folder / "model.safetensors").is_file() and not (folder / "tokenizer_config.json").exists()
    assert not list(folder.parent.glob("*.tmp*"))  # written through a scratch folder, none left behind
