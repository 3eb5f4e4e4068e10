"""Answer fidelity: metrics on hand-made strings with hand-computed values; teacher log-likelihood per byte
against a plain forward; batched greedy generation against a one-prompt argmax loop; the side-by-side records."""

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_llama, tiny_tokenizer

from distillery.errors import DistilleryError
from distillery.tasks.fidelity import (ANSWERS, chat_ids, distinct_2, generate_answers, greedy_spread, longest_repeated_ngram,
                                       read_prompts, rouge_l, score_fidelity, teacher_logprob_per_byte)

pytest.importorskip("rouge_score")


def test_distinct_2():
    assert distinct_2("a b a b") == pytest.approx(2 / 3)  # bigrams ab, ba, ab
    assert distinct_2("the cat sat on the mat") == 1.0
    assert distinct_2(",  , , ,") == pytest.approx(1 / 3)  # a row of commas: one bigram, three times
    assert distinct_2("one") is None and distinct_2("   ") is None


def test_greedy_spread_by_hand():
    # distinct-2: "a b c" 2/2 = 1, "a a a" 1/2, "x" none (one word), "   " none and empty
    out = greedy_spread(["a b c", "a a a", "x", "   "])
    assert out["answers"] == 4 and out["scored"] == 2 and out["empty_or_whitespace"] == 1
    assert out["distinct_2"] == pytest.approx(0.75) and out["distinct_2_min"] == pytest.approx(0.5)
    # sample sd of (1, 0.5) = sqrt(0.125); / sqrt(2) = 0.25
    assert out["distinct_2_stderr"] == pytest.approx(0.25)
    one = greedy_spread(["a b"])
    assert one["distinct_2"] == 1.0 and one["distinct_2_stderr"] is None
    assert greedy_spread([""])["distinct_2"] is None and greedy_spread([""])["empty_or_whitespace"] == 1


def test_longest_repeated_ngram():
    assert longest_repeated_ngram("a b c a b c a") == 4  # "a b c a" at tokens 0 and 3
    assert longest_repeated_ngram("a a a a") == 3  # overlapping occurrences count
    assert longest_repeated_ngram("the cat sat on the mat") == 1  # "the"
    assert longest_repeated_ngram("x y z") == 0 and longest_repeated_ngram("") == 0


def test_rouge_l_f():
    # LCS("the cat sat on the mat", "the cat on the mat") = 5: P = 5/5, R = 5/6, F = 2PR/(P+R) = 10/11
    assert rouge_l("the cat on the mat", "the cat sat on the mat") == pytest.approx(10 / 11)
    # LCS("a b c d", "a c e") = 2 ("a c"): P = 2/4, R = 2/3, F = 4/7
    assert rouge_l("a b c d", "a c e") == pytest.approx(4 / 7)
    assert rouge_l("The CAT, sat!", "the cat sat") == pytest.approx(1.0)  # lower-cased, punctuation dropped
    assert rouge_l("", "the cat") == 0.0


def test_teacher_logprob_per_byte_matches_hand_forward():
    tok, model = tiny_tokenizer(), tiny_llama(seed=2)
    prompts = ["Who is there?", "Speak.", "Say nothing"]
    answers = ["Nay, answer me.", "café au lait", ""]
    got = teacher_logprob_per_byte(model, tok, prompts, answers, batch_size=2)
    for p, a, g in zip(prompts[:2], answers[:2], got):
        ctx, ans = chat_ids(tok, p), tok(a, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([ctx + ans])).logits[0], dim=-1)  # (T, V)
        hand = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(ans)) / len(a.encode("utf-8"))
        assert g == pytest.approx(hand, abs=1e-5)
    assert len("café au lait".encode("utf-8")) == 13  # per byte, not per character
    assert got[2] is None  # an empty answer has no bytes to score


def test_chat_ids_use_the_template():
    tok = tiny_tokenizer()
    text = tok.decode(chat_ids(tok, "Hello"))
    assert text == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    tok.chat_template = None
    assert tok.decode(chat_ids(tok, "Hello")) == "Hello\n"


def test_batched_greedy_equals_one_prompt_argmax_loop():
    tok, model = tiny_tokenizer(), tiny_llama(seed=6)
    prompts = ["To be or not to be?", "Hi", "What news from the court of Denmark today?"]
    got = generate_answers(model, tok, prompts, do_sample=False, max_new_tokens=8, batch_size=3)
    assert generate_answers(model, tok, prompts, do_sample=False, max_new_tokens=8, batch_size=2) == got  # in prompt order
    for p, g in zip(prompts, got):
        ids, new = chat_ids(tok, p), []
        with torch.no_grad():
            for _ in range(8):
                nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                new.append(nxt)
        assert g == tok.decode(new, skip_special_tokens=True)


def test_sampled_answers_are_seeded():
    tok, model = tiny_tokenizer(), tiny_llama(seed=6)
    prompts = ["To be or not to be?", "Hi", "What news from the court of Denmark today?", "Who is there?"]
    kw = dict(do_sample=True, max_new_tokens=8, batch_size=2)
    first = generate_answers(model, tok, prompts, seed=5, **kw)
    assert generate_answers(model, tok, prompts, seed=5, **kw) == first
    assert generate_answers(model, tok, prompts, seed=6, **kw) != first  # other draws (a random tiny model: many words)
    assert first != generate_answers(model, tok, prompts, do_sample=False, max_new_tokens=8, batch_size=2)


def test_score_fidelity_records_and_means():
    tok, model = tiny_tokenizer(), tiny_llama(seed=0)
    prompts = ["Who is there?", "Long live the king."]
    res = score_fidelity(model, tok, model, tok, prompts, max_new_tokens=6, seed=3, batch_size=2)
    assert [r["prompt"] for r in res["records"]] == prompts
    for r in res["records"]:
        assert set(r["answers"]) == set(ANSWERS)
        # the same model as student: the same answers (sampling is seeded per model), so the same scores
        assert r["answers"]["student_greedy"] == r["answers"]["teacher_greedy"]
        assert r["answers"]["student_sampled"] == r["answers"]["teacher_sampled"]
        assert r["scores"]["student_sampled"] == r["scores"]["teacher_sampled"]
        assert r["scores"]["teacher_greedy"]["rouge_l"] is None
    for name in ANSWERS:
        vals = [r["scores"][name]["teacher_logprob_per_byte"] for r in res["records"]]
        vals = [v for v in vals if v is not None]
        assert res["means"][name]["teacher_logprob_per_byte"] == pytest.approx(sum(vals) / len(vals))
        assert res["means"][name]["empty_or_whitespace"] == sum(
            not r["answers"][name].strip() for r in res["records"])
    assert res["settings"]["n_prompts"] == 2 and res["settings"]["teacher_chat_template"] is True
    # a second student reuses the teacher's answers: the teacher's rows are unchanged
    reuse = {k: [r["answers"][k] for r in res["records"]] for k in ("teacher_greedy", "teacher_sampled")}
    other = score_fidelity(model, tok, tiny_llama(seed=1), tok, prompts, max_new_tokens=6, seed=3, batch_size=2,
                           teacher_answers=reuse)
    for a, b in zip(res["records"], other["records"]):
        for k in ("teacher_greedy", "teacher_sampled"):
            assert b["answers"][k] == a["answers"][k] and b["scores"][k] == a["scores"][k]
    # ... and the teacher's log-likelihoods of them: taken as given (here marked), the students' still scored
    marked = {k: [-9.0, -8.0] for k in reuse}
    third = score_fidelity(model, tok, tiny_llama(seed=1), tok, prompts, max_new_tokens=6, seed=3, batch_size=2,
                           teacher_answers=reuse, teacher_ll=marked)
    for i, (b, c) in enumerate(zip(other["records"], third["records"])):
        assert c["scores"]["teacher_greedy"]["teacher_logprob_per_byte"] == marked["teacher_greedy"][i]
        assert c["scores"]["student_greedy"] == b["scores"]["student_greedy"]
    with pytest.raises(DistilleryError, match="one log-likelihood per prompt"):
        score_fidelity(model, tok, model, tok, prompts, max_new_tokens=2, teacher_answers=reuse,
                       teacher_ll={"teacher_greedy": [-1.0]})


def test_read_prompts(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("First prompt\n\n  Second prompt  \n")
    assert read_prompts(txt) == ["First prompt", "Second prompt"]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "Hi"}\n{"text": "no prompt key"}\n')
    with pytest.raises(DistilleryError, match=r"p\.jsonl:2: .*\"prompt\""):
        read_prompts(jl)
    with pytest.raises(DistilleryError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")
