"""The demo's new pieces on tiny models: prompts, the teacher's cached (resumable) answers, the chat files,
the character-level degeneration measures, the goals and the report's task section."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import tiny_llama, tiny_tokenizer

from distillery.config import DataConfig
from distillery.data import build_datasets
from distillery.demo_chat import (TEMPLATES, demo_prompts, milton_passages, more_heldout_prompts, shakespeare_passages,
                                  teacher_answers, write_chat)
from distillery.demo_eval import goals, paired_difference
from distillery.errors import DistilleryError
from distillery.report.tasks import render_tasks
from distillery.tasks.fidelity import chat_ids, distinct_char_4, repeat_share


def test_prompts_are_seeded_and_from_both_corpora():
    a, b = demo_prompts(6, "shakespeare", seed=1), demo_prompts(6, "shakespeare", seed=1)
    assert a == b and len(set(a)) == 6 and a != demo_prompts(6, "shakespeare", seed=2)
    assert all(p.startswith(t.split("{p}")[0]) for p, t in zip(a, TEMPLATES))
    assert set(demo_prompts(4, "milton")).isdisjoint(a)
    assert len(shakespeare_passages()) > 1000 and len(milton_passages()) > 1000
    with pytest.raises(DistilleryError, match="passages"):
        demo_prompts(10**6, "milton")


def _argmax_answer(model, tok, prompt: str, n: int) -> str:
    ids, new = chat_ids(tok, prompt), []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
    return tok.decode(new, skip_special_tokens=True)


def test_teacher_answers_greedy_cached_and_resumed(tmp_path: Path):
    tok, model = tiny_tokenizer(), tiny_llama(seed=4)
    prompts = ["Who is there?", "Long live the king.", "Speak, speak!", "What, has this thing appeared again tonight?",
               "Peace, break thee off."]
    path = tmp_path / "answers.jsonl"
    got = teacher_answers(model, tok, prompts, path, max_new_tokens=6, batch_size=2, log=lambda m: None)
    assert got == [_argmax_answer(model, tok, p, 6) for p in prompts]  # batched, left-padded == one by one
    lines = path.read_text().splitlines()
    assert len(lines) == 5 and {json.loads(ln)["i"] for ln in lines} == set(range(5))
    # killed after the first batch (a torn line at the end): the rest is generated again, the same answers
    path.write_text("\n".join(lines[:2]) + '\n{"i": 3, "pro')
    calls = []
    again = teacher_answers(model, tok, prompts, path, max_new_tokens=6, batch_size=2, log=calls.append)
    assert again == got and len(calls) == 2  # two of the three batches were left
    assert teacher_answers(model, tok, prompts, path, max_new_tokens=6, batch_size=2, log=calls.append) == got
    assert len(calls) == 2  # nothing generated the third time
    with pytest.raises(DistilleryError, match=r"answers.jsonl:1: an answer for other prompts or settings"):
        teacher_answers(model, tok, prompts, path, max_new_tokens=7, batch_size=2)


def test_sampled_answers_are_seeded(tmp_path: Path):
    tok, model = tiny_tokenizer(), tiny_llama(seed=4)
    prompts = ["Who is there?", "Long live the king.", "Speak!"]
    kw = dict(max_new_tokens=8, batch_size=2, sample_temperature=1.0, log=lambda m: None)
    a = teacher_answers(model, tok, prompts, tmp_path / "a.jsonl", seed=5, **kw)
    assert a == teacher_answers(model, tok, prompts, tmp_path / "b.jsonl", seed=5, **kw)
    assert a != teacher_answers(model, tok, prompts, tmp_path / "c.jsonl", seed=6, **kw)


def test_chat_file_trains_on_answers_only(tmp_path: Path):
    tok = tiny_tokenizer()
    n = write_chat(tmp_path / "c.jsonl", ["Who is there?", "Speak!"], ["Nay, answer me.", "  "], "Be brief.")
    assert n == 1  # the whitespace answer is left out
    rec = json.loads((tmp_path / "c.jsonl").read_text())
    assert [m["role"] for m in rec["messages"]] == ["system", "user", "assistant"]
    ds = build_datasets(DataConfig(train=[str(tmp_path / "c.jsonl")], seq_len=64, val_fraction=0.0), tok,
                        progress=False).train
    item = ds[0]
    targets = item["labels"][item["labels"] != -100]
    assert tok.decode(targets) == "Nay, answer me.<|im_end|>"


def test_character_degeneration():
    assert repeat_share("abcabcabc") == pytest.approx(6 / 9)
    assert repeat_share("") == 0.0 and repeat_share("abcd") == 0.0 and repeat_share("aaaa") == pytest.approx(3 / 4)
    assert distinct_char_4("1.1.1.1.1.1") == pytest.approx(2 / 8)  # "1.1." and ".1.1": a loop distinct-2 cannot see
    assert distinct_char_4("abcdefg") == 1.0 and distinct_char_4("abc") is None


RESULTS = {
    "teacher": {"name": "T", "parameters": 100, "blimp": {"overall": 0.70, "per_field": {"syntax": 0.72}},
                "fidelity": {"teacher_greedy": {"teacher_logprob_per_byte": -0.5, "rouge_l": None, "distinct_2": 0.9,
                                                "longest_repeated_ngram": 1.0, "distinct_char_4": 0.9,
                                                "repeat_share": 0.1, "empty_or_whitespace": 0}}},
    "runs": {"kd": {"blimp": {"overall": 0.69, "per_field": {"syntax": 0.70}},
                    "fidelity": {"student_greedy": {"teacher_logprob_per_byte": -0.7, "rouge_l": 0.4, "distinct_2": 0.8,
                                                    "longest_repeated_ngram": 2.0, "distinct_char_4": 0.8,
                                                    "repeat_share": 0.2, "empty_or_whitespace": 0},
                                 "student_greedy_distinct_2_min": 0.6}},
             "ce": {"blimp": {"overall": 0.60, "per_field": {"syntax": 0.61}},
                    "fidelity": {"student_greedy": {"teacher_logprob_per_byte": -1.1, "rouge_l": 0.3, "distinct_2": 0.4,
                                                    "longest_repeated_ngram": 5.0, "distinct_char_4": 0.3,
                                                    "repeat_share": 0.6, "empty_or_whitespace": 2}}}},
    "blimp": {"n_pairs": 670, "per_paradigm": 10, "prefix": "<|endoftext|>", "credit": "BLiMP: Warstadt et al. 2020"},
}


def test_goals_on_hand_numbers():
    g = goals(RESULTS["teacher"], RESULTS["runs"])
    assert g["blimp_kept_above_chance"] == pytest.approx(0.19 / 0.20)
    assert g["goal: BLiMP kept above chance >= 0.9"] is True
    assert g["goal: greedy answers never empty, distinct-2 >= 0.5"] is True
    assert g["goal: KD answers closer to the teacher's log-likelihood than CE's"] is True  # |-0.2| < |-0.6|
    bad = {"kd": dict(RESULTS["runs"]["kd"], blimp={"overall": 0.65}), "ce": RESULTS["runs"]["ce"]}
    assert goals(RESULTS["teacher"], bad)["goal: BLiMP kept above chance >= 0.9"] is False  # 0.75


def test_answer_goal_reads_all_the_heldout_prompts():
    """With the more prompts' answers the goal reads them and the fidelity ones together, not the fidelity 12."""
    kd = dict(RESULTS["runs"]["kd"], greedy_all_heldout={"answers": 108, "scored": 108, "distinct_2": 0.45,
                                                         "distinct_2_stderr": 0.03, "distinct_2_min": 0.1,
                                                         "empty_or_whitespace": 0})
    g = goals(RESULTS["teacher"], {"kd": kd, "ce": RESULTS["runs"]["ce"]})
    assert g["kd_greedy_distinct_2_fidelity_prompts"] == 0.8 and g["kd_greedy_distinct_2"] == 0.45
    assert g["kd_greedy_prompts"] == 108 and g["kd_greedy_distinct_2_stderr"] == 0.03
    assert g["goal: greedy answers never empty, distinct-2 >= 0.5"] is False  # 0.8 on the 12 does not save it
    html = render_tasks({**RESULTS, "runs": {"kd": kd, "ce": RESULTS["runs"]["ce"]}, "goals": g})
    assert "Greedy answers to all the held-out prompts" in html and "<td>108</td>" in html and "0.450" in html
    assert "all the held-out prompts" not in render_tasks(RESULTS)  # results without them: no such table
    kd["greedy_all_heldout"] = dict(kd["greedy_all_heldout"], distinct_2=0.6, empty_or_whitespace=1)
    assert goals(RESULTS["teacher"], {"kd": kd})["goal: greedy answers never empty, distinct-2 >= 0.5"] is False


def test_paired_difference_skips_unscored_prompts():
    d = paired_difference([-0.2, -0.5, None, -0.3], [-0.6, -0.4, -0.1, None])  # pairs: +0.4, -0.1
    assert d["prompts"] == 2 and d["mean"] == pytest.approx(0.15)
    assert d["stderr"] == pytest.approx((0.125 ** 0.5) / 2 ** 0.5)  # sd of (0.4, -0.1) = sqrt(0.125)
    assert paired_difference([-0.2, None], [-0.1, -0.3]) is None


def test_more_heldout_prompts_are_seeded_and_other_than_the_demos():
    demo12 = demo_prompts(12, "milton", 0)
    more = more_heldout_prompts(96, demo12)
    assert len(more) == len(set(more)) == 96 and not set(more) & set(demo12)
    assert more == more_heldout_prompts(96, demo12)  # the same on every machine
    assert more[:5] == more_heldout_prompts(5, demo12)  # a longer list extends a shorter one
    assert all(any(p.startswith(t.split("{p}")[0]) for t in TEMPLATES) for p in more)
    assert more_heldout_prompts(0, demo12) == []
    with pytest.raises(DistilleryError, match="more held-out prompts"):
        more_heldout_prompts(len(milton_passages()) + 1, [])


def test_report_task_section():
    html = render_tasks({**RESULTS, "goals": goals(RESULTS["teacher"], RESULTS["runs"])})
    for text in ("70.0%", "69.0%", "0.95", "0.50", "Warstadt", "&lt;|endoftext|&gt;", "-0.700", "kd (greedy)",
                 "teacher (greedy)", "repeat share", "<b>met</b>"):
        assert text in html, text
    assert render_tasks({"runs": {"kd": {"heldout": {}}}}) == ""  # an older results.json: no section


def test_quality_task_scores_on_tiny_models():
    """benchmarks/quality.py's BLiMP + fidelity for every arm: a student equal to the teacher keeps all of it."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import quality

    tok, teacher, other = tiny_tokenizer(), tiny_llama(seed=1), tiny_llama(seed=2)
    res = quality.task_scores(teacher, tok, {"same": teacher, "other": other}, per_paradigm=1,
                              prompts=["Who is there?", "Speak!"], max_new_tokens=6)
    assert res["blimp"]["n_pairs"] == 67 and res["blimp"]["prefix"] == "<|endoftext|>"
    same, t = res["runs"]["same"], res["teacher"]
    assert same["blimp"]["overall"] == t["blimp"]["overall"] and same["blimp_retained_above_chance"] in (None, 1.0)
    # the same model answers greedily what the teacher did: ROUGE-L 1 (or both empty), same log-likelihood
    assert [a["student_greedy"] for a in same["answers"]] == [a["teacher_greedy"] for a in same["answers"]]
    assert same["fidelity"]["student_greedy"]["teacher_logprob_per_byte"] == \
        pytest.approx(t["fidelity"]["teacher_greedy"]["teacher_logprob_per_byte"], abs=1e-5, nan_ok=True)
    assert set(res["runs"]["other"]["fidelity"]) == {"student_greedy", "student_sampled"}
    assert res["runs"]["other"]["answers"][0]["teacher_greedy"] == same["answers"][0]["teacher_greedy"]  # reused


def test_blimp_prefix_may_be_the_unk_token():
    """SmolLM2's unk token is <|endoftext|>, the demo's BLiMP prefix: it must be accepted, a made-up one refused."""
    from distillery.tasks.blimp import _token_id

    tok = tiny_tokenizer()
    tok.unk_token = "<|endoftext|>"
    assert _token_id(tok, "<|endoftext|>") == tok.convert_tokens_to_ids("<|endoftext|>") == tok.unk_token_id
    with pytest.raises(DistilleryError, match="not in the tokenizer"):
        _token_id(tok, "<|made_up|>")


def test_report_page_carries_the_task_section_and_answers(tmp_path: Path):
    from distillery.report import write_report

    for name in ("kd", "ce"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0, "tok_s": 10.0}) + "\n")
    samples = [{"prompt": "Explain <this>", "teacher": "It means", "student": "\n\n", "student_run": "kd",
                "decoding": "greedy, chat template"}]
    (tmp_path / "results.json").write_text(json.dumps({**RESULTS, "samples": samples}))
    page = write_report(tmp_path).read_text()
    assert "<h2>Task scores</h2>" in page and "69.0%" in page and "Explain &lt;this&gt;" in page
    assert "(greedy, chat template)" in page and "<i>(only whitespace)</i>" in page


def test_demo_folder_is_reused_only_for_the_same_settings(tmp_path: Path):
    from distillery.demo import _claim

    marker = {"demo": 2, "settings": {"steps": 60}, "overrides": []}
    _claim(tmp_path / "d", marker)
    (tmp_path / "d" / "kd").mkdir()
    _claim(tmp_path / "d", dict(marker))  # the same demo again: its cached answers and runs are reused
    # another demo's settings (or version): that demo is moved aside whole, not mixed with this one nor deleted
    assert _claim(tmp_path / "d", {**marker, "settings": {"steps": 12}}) == tmp_path / "d.prev-1"
    assert (tmp_path / "d.prev-1" / "kd").is_dir() and json.loads((tmp_path / "d.prev-1" / "demo.json").read_text()) == marker
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["demo.json"]
    assert _claim(tmp_path / "d", marker) == tmp_path / "d.prev-2"  # the next free name
    (tmp_path / "old" / "kd").mkdir(parents=True)  # a folder that is no demo's (no marker): refused, left as it is
    with pytest.raises(DistilleryError, match="give another --output-dir or delete it"):
        _claim(tmp_path / "old", marker)
    assert (tmp_path / "old" / "kd").is_dir()
    (tmp_path / "a-file").write_text("x")  # --output-dir naming a file: one line, not mkdir's "File exists"
    with pytest.raises(DistilleryError, match="demo: --output-dir '.*a-file' is a file; give a folder"):
        _claim(tmp_path / "a-file", marker)


def test_teacher_cache_is_keyed_by_the_teacher_and_shared_by_demos(tmp_path: Path):
    """Answers and the teacher's BLiMP table live under the teacher's weights hash: another output folder reads them,
    another teacher (other weights) or other prompts/settings get their own files."""
    from distillery.demo_chat import answers_path, teacher_cache
    from distillery.demo_eval import teacher_blimp
    from distillery.tasks.blimp import load_pairs
    from distillery.teachers.hf import HFTeacher

    tok = tiny_tokenizer()
    t1 = HFTeacher(model=tiny_llama(seed=4), tokenizer=tok, name="tiny/x", source="t", device=torch.device("cpu"))
    t2 = HFTeacher(model=tiny_llama(seed=5), tokenizer=tok, name="tiny/x", source="t", device=torch.device("cpu"))
    c1, c2 = teacher_cache(t1, home=tmp_path), teacher_cache(t2, home=tmp_path)
    assert c1.parent == tmp_path / "demo" and c1.name == f"tiny_x-{t1.weights_hash()[:16]}" and c1 != c2
    prompts = ["Who is there?", "Speak!"]
    p = answers_path(c1, "train", tok, prompts, max_new_tokens=6, batch_size=2)
    assert p == answers_path(c1, "train", tok, list(prompts), max_new_tokens=6, batch_size=2)
    assert p != answers_path(c1, "train", tok, prompts, max_new_tokens=7, batch_size=2)
    assert p != answers_path(c1, "train", tok, prompts[:1], max_new_tokens=6, batch_size=2)
    calls = []
    first = teacher_answers(t1.model, tok, prompts, p, max_new_tokens=6, batch_size=2, log=calls.append)
    assert len(calls) == 1 and teacher_answers(t1.model, tok, prompts, p, max_new_tokens=6, batch_size=2,
                                               log=calls.append) == first and len(calls) == 1  # read, not generated
    pairs = load_pairs(per_paradigm=1, seed=0)[:4]
    path = c1 / "blimp-k.json"
    table = teacher_blimp(t1.model, tok, pairs, path, {"k": 1})
    assert json.loads(path.read_text())["table"]["overall"] == table["overall"]
    assert teacher_blimp(None, tok, pairs, path, {"k": 1}) == table  # cached: the model is not even touched
    with pytest.raises(AttributeError):
        teacher_blimp(None, tok, pairs, path, {"k": 2})  # another key scores again (here: no model to score with)


def test_compute_info_names_threads_and_the_resolved_precision(monkeypatch):
    """The demo records what it ran with: torch's thread count and 'auto' resolved by the hardware probe."""
    from distillery.config import load_config
    from distillery.demo import SETTINGS, compute_info, train_overrides
    from distillery.hardware import _cached_probe

    monkeypatch.setenv("DISTILLERY_CPU_BF16", "0")
    _cached_probe.cache_clear()
    try:
        cfg = load_config(None, train_overrides(SETTINGS["full"], quick=False))
        assert cfg.train.max_steps == SETTINGS["full"]["steps"] and cfg.train.mixed_precision == "auto"
        assert cfg.data.weights == {"chat": SETTINGS["full"]["chat_weight"]}  # the demo weights its conversations
        info = compute_info(cfg)
        assert info["torch_threads"] == torch.get_num_threads()
        if info["device"] == "cpu":
            assert info["train_precision"] == "no" and info["cpu_bf16_probe"]["decided_by"] == "DISTILLERY_CPU_BF16"
    finally:
        _cached_probe.cache_clear()


def test_remembered_teacher_scores_each_batch_once():
    from distillery.demo_eval import RememberedTeacher
    from distillery.evaluate import evaluate
    from distillery.teachers.hf import HFTeacher

    model = tiny_llama(seed=0).eval()
    calls = []

    class Counting(HFTeacher):
        def targets(self, batch, vocab_size=None):
            calls.append(1)
            return super().targets(batch, vocab_size)

    teacher = Counting(model=model, tokenizer=None, name="t", source="t", device=torch.device("cpu"))
    ids = torch.randint(0, model.config.vocab_size, (2, 2, 12))
    batches = [{"input_ids": x, "labels": x.clone(), "attention_mask": torch.ones_like(x)} for x in ids]
    plain = [evaluate(teacher, tiny_llama(seed=s), batches) for s in (1, 2)]
    assert len(calls) == 4
    calls.clear()
    kept = RememberedTeacher(teacher)
    again = [evaluate(kept, tiny_llama(seed=s), batches) for s in (1, 2)]
    assert len(calls) == 2 and again == plain  # the second student costs the teacher nothing, same numbers
    masked = dict(batches[0], labels=batches[0]["labels"].masked_fill(torch.arange(12) < 6, -100))
    kept.targets(masked)
    assert len(calls) == 3  # other labels (another target mask): other targets
