"""Cross-tokenizer distillation through the loop: a student with its own tokenizer (``student.tokenizer``), a live
or served teacher scoring the same bytes in its own tokens, validation in bits per byte.

Pinned: (1) the teacher's view of a student batch spells the same bytes; (2) with the teacher's own tokenizer given
as the student's (a copy in another folder), ``student.tokenizer`` changes nothing: the same run, step for step;
(3) a real pair (byte-level 512 teacher -> a 700-entry BPE trained on the data) trains, KD lowers the aligned KL
against a CE-only student, and a served teacher gives the live teacher's losses."""

from __future__ import annotations

import math

import pytest
import torch

from distillery.config import load_config
from distillery.errors import DistilleryError
from distillery.train import distill
from helpers_run import make_teacher, run_metrics, write_recipe
from scoring_server import ScoringServer

DATA = {"max_train_blocks": 24, "max_val_blocks": 4}
TRAIN = {"max_steps": 6, "save_every": 0, "eval_every": 0, "eval_batches": 1, "mixed_precision": "no"}


def _train(run):
    return [m for m in run_metrics(run) if "loss" in m]


def _val(run):
    return [m for m in run_metrics(run) if m.get("split") == "val"][-1]


def test_the_teacher_view_spells_the_same_bytes(tmp_path):
    from distillery.student_tokenizer import train_bpe
    from distillery.xtok.batch import CrossTokenizer
    from tiny import corpus_text, tiny_tokenizer

    t_tok = tiny_tokenizer(512)
    s_tok = train_bpe([corpus_text(50_000)], 700)
    x = CrossTokenizer(t_tok, s_tok)
    ids = s_tok.encode(corpus_text(3000)[1000:1400])
    T = len(ids) - 1
    batch = {"input_ids": torch.tensor([ids[:-1]]), "labels": torch.tensor([ids[1:]]), "attention_mask": torch.ones(1, T, dtype=torch.long)}
    view = x.view(batch)
    s_text = s_tok.decode(ids)
    t_ids = view.batch["input_ids"][0].tolist() + [view.batch["labels"][0, -1].item()]
    assert t_tok.decode(t_ids) == s_text  # the same text, in the teacher's tokens
    counts = view.alignment.counts()
    assert counts["1-1"] > 0.5 * T and counts["none"] < 0.05 * T


def test_the_teachers_own_tokenizer_as_the_students_changes_nothing(tmp_path):
    t = make_teacher(tmp_path)
    from transformers import AutoTokenizer

    copy = tmp_path / "same_tok"
    AutoTokenizer.from_pretrained(str(t)).save_pretrained(str(copy))
    a, b = tmp_path / "a", tmp_path / "b"
    distill(load_config(write_recipe(tmp_path, a, data=DATA, train=TRAIN)))
    distill(load_config(write_recipe(tmp_path, b, data=DATA, train=TRAIN, student={"tokenizer": str(copy)})))
    for x, y in zip(_train(a), _train(b), strict=True):
        assert x["kd"] == pytest.approx(y["kd"], rel=1e-6) and x["ce"] == pytest.approx(y["ce"], rel=1e-6)


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    from distillery.student_tokenizer import train_bpe
    from helpers_run import make_corpus

    root = tmp_path_factory.mktemp("bpe")
    tok = train_bpe([make_corpus(root).read_text()], 700)
    tok.save_pretrained(str(root / "tok"))
    return root / "tok"


def test_a_student_with_its_own_tokenizer_learns_from_the_teacher(tmp_path, bpe_dir):
    kd, ce = tmp_path / "kd", tmp_path / "ce"
    student = {"tokenizer": str(bpe_dir)}
    train = {**TRAIN, "max_steps": 12, "lr": 1e-2}
    distill(load_config(write_recipe(tmp_path, kd, data=DATA, train=train, student=student)))
    distill(load_config(write_recipe(tmp_path, ce, data=DATA, train=train, student=student,
                                     loss={"kd_weight": 0.0, "ce_weight": 1.0})))
    m_kd, m_ce = _val(kd), _val(ce)
    for m in (m_kd, m_ce):
        assert 0 < m["student_bits_per_byte"] < 20 and 0 < m["teacher_bits_per_byte"] < 20
        assert m["aligned_share"] > 0.5
    assert m_kd["kl_teacher_student"] < m_ce["kl_teacher_student"]  # KD moves the student towards the teacher
    from transformers import AutoConfig, AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(str(kd / "student"))) == 700
    assert AutoConfig.from_pretrained(str(kd / "student")).vocab_size == 700


def test_a_served_teacher_scores_the_students_bytes_like_the_live_one(tmp_path, bpe_dir):
    from distillery.teachers import load_teacher

    live = load_teacher(str(make_teacher(tmp_path)))
    a, b = tmp_path / "live", tmp_path / "served"
    student = {"tokenizer": str(bpe_dir)}
    distill(load_config(write_recipe(tmp_path, a, data=DATA, train=TRAIN, student=student)))
    with ScoringServer(live.model) as srv:
        served = {"kind": "served", "source": str(make_teacher(tmp_path)), "base_urls": [srv.base_url],
                  "top_logprobs": 512, "max_retries": 0}
        distill(load_config(write_recipe(tmp_path, b, data=DATA, train=TRAIN, student=student, teacher=served)))
    for x, y in zip(_train(a), _train(b), strict=True):
        assert x["kd"] == pytest.approx(y["kd"], rel=1e-3, abs=1e-4)


def test_unsupported_cross_tokenizer_settings_are_one_line_errors(tmp_path, bpe_dir):
    # init 'pruned' with student.tokenizer is supported since the embedding transplant (tests/test_xtok_transplant.py)
    for extra, match in ((dict(student={"tokenizer": "bpe:12"}), "bpe:N"),
                         (dict(student={"tokenizer": str(tmp_path / "nope")}), "neither")):
        with pytest.raises(DistilleryError, match=match):
            distill(load_config(write_recipe(tmp_path, tmp_path / "x", data=DATA, train=TRAIN, **extra)))


def test_through_the_batch_view_identical_tokenizers_give_the_same_vocabulary_loss():
    from types import SimpleNamespace

    from distillery.losses import forward_kl
    from distillery.targets import TeacherTargets
    from distillery.xtok.batch import CrossTokenizer
    from tiny import corpus_text, tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer(512)
    x = CrossTokenizer(tok, tok)
    ids = tok.encode(corpus_text(5000)[2000:2600])[:65]
    batch = {"input_ids": torch.tensor([ids[:-1]]), "labels": torch.tensor([ids[1:]]), "attention_mask": torch.ones(1, 64, dtype=torch.long)}
    view = x.view(batch)
    assert torch.equal(view.batch["input_ids"], batch["input_ids"]) and torch.equal(view.batch["labels"], batch["labels"])
    teacher, student = tiny_llama(seed=1), tiny_llama(seed=2)
    t_logits = teacher(batch["input_ids"]).logits.detach()
    hidden = student.base_model(batch["input_ids"]).last_hidden_state
    head = student.get_output_embeddings()
    cfg = SimpleNamespace(xtok_method="exact_kl", xtok_span_weight=1.0, loss_temperature=1.0)
    got = x.loss(hidden, head, TeacherTargets(logits=t_logits), view, batch["labels"], cfg, 16)
    one = view.alignment.kind[0] == 1
    assert one.sum() >= 60  # all but the edges
    want = forward_kl(head(hidden), TeacherTargets(logits=t_logits))[0][one].sum()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_on_policy_steps_with_another_tokenizer_score_the_students_samples(tmp_path, bpe_dir):
    from distillery.onpolicy import on_policy_batch
    from distillery.run_setup import prepare_run

    gen = {"on_policy_fraction": 1.0, "max_new_tokens": 12, "prompt_tokens": 8, "sample_temperature": 1.0}
    cfg = load_config(write_recipe(tmp_path, tmp_path / "op", data=DATA, train=TRAIN, generation=gen,
                                   student={"tokenizer": str(bpe_dir)}))
    run = prepare_run(cfg, torch.device("cpu"))
    sampled = on_policy_batch(run.student, run.train.batch([0, 1]), run.tokenizer, cfg.generation,
                              generator=torch.Generator().manual_seed(0), vocab_size=run.vocab_size)
    view = run.xtok.view(sampled)
    s_tok, t_tok = run.xtok.student_tokenizer, run.xtok.teacher_tokenizer
    for b in range(2):  # the teacher reads the student's sample, prompt and continuation, as the same text
        n = int(sampled["attention_mask"][b].sum())
        m = int(view.batch["attention_mask"][b].sum())
        s_text = s_tok.decode(sampled["input_ids"][b, :n].tolist(), skip_special_tokens=True)
        t_text = t_tok.decode(view.batch["input_ids"][b, :m].tolist(), skip_special_tokens=True)
        assert s_text.startswith(t_text[:max(len(t_text) - 8, 1)].strip()[:20])
    aligned = view.alignment.kind != 0
    assert (sampled["labels"][aligned] != -100).all() and aligned.sum() > 4  # the samples' tokens, not the prompt
    distill(cfg)
    steps = _train(tmp_path / "op")
    assert len(steps) == TRAIN["max_steps"] and all(0 < m["kd"] < 50 for m in steps)


def test_a_stray_byte_in_a_row_leaves_the_rest_of_the_row_aligned():
    from distillery.xtok.batch import CrossTokenizer, _utf8_runs
    from tiny import tiny_tokenizer

    assert _utf8_runs(b"ab\x94cd\xe2\x82\xacx\xff", 0, 10) == [(0, 2), (3, 9)]
    tok = tiny_tokenizer(512)  # byte-level: every byte is a token of its own
    x = CrossTokenizer(tok, tok)
    good = tok.encode("Friends, Romans, countrymen", add_special_tokens=False)
    stray = tok.convert_tokens_to_ids(tok.convert_ids_to_tokens(tok.encode("\u201d", add_special_tokens=False))[:1])
    ids = good + stray + good  # the first byte of a 3-byte character, alone: not UTF-8
    T = len(ids) - 1
    view = x.view({"input_ids": torch.tensor([ids[:-1]]), "labels": torch.tensor([ids[1:]]),
                   "attention_mask": torch.ones(1, T, dtype=torch.long)})
    kinds = view.alignment.kind[0]
    n = len(good)
    assert (kinds[:n - 1] == 1).all() and (kinds[n + 1:] == 1).sum() >= n - 2  # both sides of the stray byte
    assert int(kinds[n - 1]) == 0  # the stray byte itself has no teacher counterpart


def test_unlikelihood_on_policy_steps_with_another_tokenizer(tmp_path, bpe_dir):
    """Greedy on-policy steps with loss.unlikelihood_weight across tokenizers: the repeats leave the aligned KD rows
    (the view is built on the split labels) and the run logs the term."""
    from distillery.losses.unlikelihood import split_repeats
    from distillery.onpolicy import on_policy_batch
    from distillery.run_setup import prepare_run

    gen = {"on_policy_fraction": 1.0, "max_new_tokens": 16, "prompt_tokens": 8, "sample_temperature": 0.0}
    cfg = load_config(write_recipe(tmp_path, tmp_path / "ul", data=DATA, train=TRAIN, generation=gen,
                                   student={"tokenizer": str(bpe_dir)},
                                   loss={"unlikelihood_weight": 1.0, "unlikelihood_ngram": 1}))
    run = prepare_run(cfg, torch.device("cpu"))
    sampled = on_policy_batch(run.student, run.train.batch([0, 1]), run.tokenizer, cfg.generation,
                              vocab_size=run.vocab_size)
    kd_labels, ul_labels = split_repeats(sampled["labels"], 1)
    assert (ul_labels != -100).any()  # a fresh student's greedy 16 tokens repeat a token
    view = run.xtok.view(dict(sampled, labels=kd_labels))
    assert not ((view.alignment.kind != 0) & (ul_labels != -100)).any()
    distill(cfg)
    steps = _train(tmp_path / "ul")
    assert len(steps) == TRAIN["max_steps"] and all(math.isfinite(m["unlikelihood"]) for m in steps)
    assert any(m["repeat_share"] > 0 for m in steps)


def test_a_saved_bpe_tokenizer_is_reused_only_for_its_own_size_and_text(tmp_path):
    """``bpe:N`` is trained once into ``<output_dir>/student_tokenizer`` and reused on ``--resume``; a folder left
    by ``bpe:M`` (another size) or another training text is trained afresh, not silently reused."""
    from transformers import AutoTokenizer

    from distillery.student_tokenizer import open_student_tokenizer

    cfg = load_config(write_recipe(tmp_path, tmp_path / "run"))
    teacher_tok = AutoTokenizer.from_pretrained(make_teacher(tmp_path))
    out = tmp_path / "run"
    small = open_student_tokenizer("bpe:300", teacher_tok, cfg.data, out)
    again = open_student_tokenizer("bpe:300", teacher_tok, cfg.data, out)
    assert len(again) == len(small)  # reused
    larger = open_student_tokenizer("bpe:400", teacher_tok, cfg.data, out)
    assert len(larger) > len(small)  # was: the 300-entry one, reused for bpe:400
    assert len(open_student_tokenizer("bpe:400", teacher_tok, cfg.data, out)) == len(larger)
