"""BLiMP scorer: bundled data, sentence log-probs against a plain forward + log_softmax, accuracy tables."""

import gzip
import json

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_llama, tiny_tokenizer

from distillery.errors import DistilleryError
from distillery.tasks.blimp import (accuracy_table, load_pairs, prefix_token_id, retained_above_chance, score_blimp,
                                    sentence_logprobs)

TEXTS = ["Even Suzanne has really joked around.", "Who does John leave?", "The cats sleep.",
         "What could a lot of cats break while finding all convertibles?", "Birds fly."]


def _hand_logprob(model, ids: list[int]) -> float:
    """sum_{i>=1} log p(ids[i] | ids[:i]) from one unpadded forward."""
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)  # (T, V)
    return sum(float(logp[i - 1, ids[i]]) for i in range(1, len(ids)))


def test_bundled_pairs_and_seeded_subsample():
    pairs = load_pairs()
    assert len(pairs) == 13_400
    uids = {p["uid"] for p in pairs}
    assert len(uids) == 67
    assert {p["field"] for p in pairs} == {"morphology", "semantics", "syntax", "syntax_semantics"}
    sub = load_pairs(per_paradigm=3, seed=0)
    assert len(sub) == 201 and all(sum(p["uid"] == u for p in sub) == 3 for u in uids)
    assert [p["pair_id"] for p in sub] == [p["pair_id"] for p in load_pairs(per_paradigm=3, seed=0)]
    assert [p["pair_id"] for p in sub] != [p["pair_id"] for p in load_pairs(per_paradigm=3, seed=1)]


@pytest.mark.parametrize("vocab", [512, 300])
def test_sentence_logprobs_match_hand_forward_eos_prefix(vocab):
    """No BOS: every sentence is scored after the EOS token; batches of mixed lengths (right padding)."""
    tok, model = tiny_tokenizer(vocab_size=vocab), tiny_llama(vocab_size=vocab, seed=3)
    assert tok.bos_token_id is None and prefix_token_id(tok) == tok.eos_token_id
    got = sentence_logprobs(model, tok, TEXTS, batch_size=2)
    hand = [_hand_logprob(model, [tok.eos_token_id] + tok(t, add_special_tokens=False)["input_ids"]) for t in TEXTS]
    assert got == pytest.approx(hand, abs=1e-4)


def test_sentence_logprobs_bos_prefix_and_no_prefix():
    tok, model = tiny_tokenizer(), tiny_llama(seed=4)
    tok.bos_token = "<|im_start|>"
    bos = tok.convert_tokens_to_ids("<|im_start|>")
    assert prefix_token_id(tok) == bos
    hand = [_hand_logprob(model, [bos] + tok(t, add_special_tokens=False)["input_ids"]) for t in TEXTS]
    assert sentence_logprobs(model, tok, TEXTS, batch_size=3) == pytest.approx(hand, abs=1e-4)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")  # a named prefix overrides BOS
    hand_named = [_hand_logprob(model, [im_end] + tok(t, add_special_tokens=False)["input_ids"]) for t in TEXTS]
    assert sentence_logprobs(model, tok, TEXTS, prefix="<|im_end|>") == pytest.approx(hand_named, abs=1e-4)
    with pytest.raises(DistilleryError, match="not in the tokenizer"):
        sentence_logprobs(model, tok, TEXTS, prefix="<s>")
    tok.bos_token, tok.eos_token = None, None  # neither: the first token is given, unscored
    assert prefix_token_id(tok) is None
    hand = [_hand_logprob(model, tok(t, add_special_tokens=False)["input_ids"]) for t in TEXTS]
    assert sentence_logprobs(model, tok, TEXTS, batch_size=4) == pytest.approx(hand, abs=1e-4)


def test_accuracy_table_means_over_paradigms():
    pairs = ([{"uid": "a", "field": "x"}] * 2 + [{"uid": "b", "field": "x"}] * 4 + [{"uid": "c", "field": "y"}])
    t = accuracy_table(pairs, [True, False, True, True, True, False, False])
    assert t["per_paradigm"] == {"a": 0.5, "b": 0.75, "c": 0.0}
    assert t["per_field"] == {"x": pytest.approx(0.625), "y": 0.0}
    assert t["overall"] == pytest.approx((0.5 + 0.75 + 0.0) / 3)  # not 4/7, the mean over pairs
    assert t["chance"] == 0.5 and t["n_pairs"] == 7 and t["n_paradigms"] == 3


def test_score_blimp_counts_pairs_where_good_beats_bad():
    tok, model = tiny_tokenizer(), tiny_llama(seed=5)
    pairs = load_pairs(per_paradigm=2, seed=7)
    res = score_blimp(model, tok, pairs, batch_size=16, progress=False)
    lp = {t: _hand_logprob(model, [tok.eos_token_id] + tok(t, add_special_tokens=False)["input_ids"])
          for p in pairs for t in (p["good"], p["bad"])}
    hand = accuracy_table(pairs, [lp[p["good"]] > lp[p["bad"]] for p in pairs])
    assert res["overall"] == pytest.approx(hand["overall"])
    assert res["per_field"] == pytest.approx(hand["per_field"])
    assert res["n_pairs"] == 134 and res["prefix_token"] == "<|endoftext|>" and "Warstadt" in res["credit"]


def test_retained_above_chance():
    assert retained_above_chance(0.7, 0.8) == pytest.approx(2 / 3)
    assert retained_above_chance(0.8, 0.8) == pytest.approx(1.0)
    assert retained_above_chance(0.6, 0.5) is None


def test_bad_pairs_file_names_file_and_line(tmp_path):
    good = {"uid": "u", "field": "f", "good": "A b.", "bad": "B a."}
    path = tmp_path / "pairs.jsonl.gz"
    path.write_bytes(gzip.compress((json.dumps(good) + "\n" + json.dumps({"uid": "u"}) + "\n").encode()))
    with pytest.raises(DistilleryError, match=r"pairs\.jsonl\.gz:2: .*missing \['field', 'good', 'bad'\]"):
        load_pairs(path)
    with pytest.raises(DistilleryError, match="at least 1"):
        load_pairs(per_paradigm=0)


def test_cli_eval_tasks_blimp_writes_one_json(tmp_path, capsys):
    from distillery.cli import main

    tok = tiny_tokenizer()
    for name, seed in (("teacher", 0), ("student", 1)):
        tiny_llama(seed=seed).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    out = tmp_path / "tasks.json"
    rc = main(["eval", "--teacher", str(tmp_path / "teacher"), "--student", str(tmp_path / "student"),
               "--tasks", "blimp", "--blimp-per-paradigm", "1", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["blimp"]["teacher"]["n_pairs"] == res["blimp"]["student"]["n_pairs"] == 67
    t, s = res["blimp"]["teacher"]["overall"], res["blimp"]["student"]["overall"]
    assert res["blimp"]["retained_above_chance"] == (None if t <= 0.5 else pytest.approx((s - 0.5) / (t - 0.5)))
    assert "BLiMP (67 pairs, chance 50%)" in capsys.readouterr().out
    args = ["eval", "--teacher", str(tmp_path / "teacher"), "--student", str(tmp_path / "student")]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == ("error: eval needs --data (held-out text), --tasks (blimp, fidelity, "
                                               "lmeval:...), or both")
    assert main(args + ["--tasks", "blimp,mmlu"]) == 2
    assert "unknown task 'mmlu'" in capsys.readouterr().err
