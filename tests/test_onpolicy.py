"""On-policy batches: prompts cut where the loss begins, labels only on generated tokens (EOS included)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from distillery.config import GenerationConfig
from distillery.generate import sample
from distillery.onpolicy import choose_on_policy, on_policy_batch, prompt_lengths, teacher_generate_dataset
from tiny import tiny_llama, tiny_tokenizer

PAD = 3
TOK = SimpleNamespace(pad_token_id=PAD, eos_token_id=0, get_vocab=lambda: {})


def supervised_batch():
    """Row 0: chat (prompt of 6 tokens, answer after); row 1: plain text (loss from 0); row 2: chat, right-padded."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 512, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    ids[2, 9:] = PAD
    nxt = torch.cat([ids[:, 1:], torch.full((3, 1), -100)], dim=1)
    labels = nxt.clone()
    labels[0, :5] = -100          # first target at t=5: prompt = ids[0, :6]
    labels[2, :3] = -100          # prompt = ids[2, :4]
    labels[2, 8:] = -100          # padding
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "index": torch.arange(3)}


def test_prompt_lengths():
    b = supervised_batch()
    assert prompt_lengths(b["labels"], b["attention_mask"], prompt_tokens=4).tolist() == [6, 4, 4]
    assert prompt_lengths(b["labels"], b["attention_mask"], prompt_tokens=50).tolist() == [6, 12, 4]


def expected_rows(model, batch, n_prompt, max_new, eos):
    """Reference: sample each prompt alone (no padding), cut at its first EOS."""
    rows = []
    for b, n in enumerate(n_prompt):
        p = batch["input_ids"][b:b + 1, :n]
        seq, comp = sample(model, p, torch.ones_like(p), max_new_tokens=max_new, sample_temperature=0.0,
                           eos_token_id=eos, pad_token_id=PAD)
        rows.append((p[0].tolist(), seq[0, n:][comp[0, n:] == 1].tolist()))
    return rows


@pytest.mark.parametrize("with_eos", [False, True])
def test_on_policy_batch_labels(with_eos):
    model = tiny_llama(layers=2)
    model.train()
    batch = supervised_batch()
    cfg = GenerationConfig(max_new_tokens=6, sample_temperature=0.0, prompt_tokens=5)
    eos = 0
    if with_eos:  # make row 0's 3rd greedy token an EOS
        free = expected_rows(model, batch, [6, 5, 4], 6, None)
        eos = free[0][1][2]
    out = on_policy_batch(model, batch, TOK, cfg, eos_token_id=eos)
    assert model.training and set(out) == {"input_ids", "attention_mask", "labels"}
    ref = expected_rows(model, batch, [6, 5, 4], 6, eos)
    L = max(len(p) + len(g) for p, g in ref)
    assert out["input_ids"].shape == (3, L)
    for b, (prompt, gen) in enumerate(ref):
        n, g = len(prompt), len(gen)
        assert out["input_ids"][b].tolist() == prompt + gen + [PAD] * (L - n - g)
        assert out["attention_mask"][b].tolist() == [1] * (n + g) + [0] * (L - n - g)
        assert out["labels"][b].tolist() == [-100] * (n - 1) + gen + [-100] * (L - n - g + 1)
        if with_eos and eos in gen:
            assert gen[-1] == eos and gen.count(eos) == 1  # the EOS is a target; nothing after it
    if with_eos:
        assert len(ref[0][1]) == 3


def test_student_logits_on_on_policy_batch_predict_its_greedy_labels():
    """Positions start at 0 after re-alignment: the student's argmax at every target is the label it sampled."""
    model = tiny_llama(layers=2)
    out = on_policy_batch(model, supervised_batch(), TOK, GenerationConfig(max_new_tokens=5, sample_temperature=0.0,
                                                                           prompt_tokens=3))
    with torch.no_grad():
        logits = model(input_ids=out["input_ids"], attention_mask=out["attention_mask"]).logits
    t = out["labels"] != -100
    assert int(t.sum()) > 0
    assert torch.equal(logits.argmax(-1)[t], out["labels"][t])


def test_choose_on_policy_is_a_pure_function_of_seed_and_step():
    assert not any(choose_on_policy(s, 0.0, 0) for s in range(200))  # lambda = 0: the supervised path, always
    assert all(choose_on_policy(s, 1.0, 0) for s in range(200))
    picks = [choose_on_policy(s, 0.3, 7) for s in range(2000)]
    assert picks == [choose_on_policy(s, 0.3, 7) for s in range(2000)]
    assert picks[1000:1010] == [choose_on_policy(s, 0.3, 7) for s in range(1000, 1010)]  # resume at step 1000
    assert sum(picks) / 2000 == pytest.approx(0.3, abs=0.04)


def test_teacher_generate_dataset_writes_chat_records(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_llama(layers=1)
    prompts = ["Speak, my lord.", [{"role": "user", "content": "Who goes there?"}]]
    out = tmp_path / "seqkd.jsonl"
    assert teacher_generate_dataset(model, prompts, out, tokenizer=tok, max_new_tokens=6, batch_size=2) == 2
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["messages"][0]["content"] for r in records] == ["Speak, my lord.", "Who goes there?"]
    for r, p in zip(records, ["Speak, my lord.", "Who goes there?"]):
        assert r["messages"][-1]["role"] == "assistant"
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
        ids = torch.tensor([ids["input_ids"] if hasattr(ids, "keys") else ids])
        seq, comp = sample(model, ids, torch.ones_like(ids), max_new_tokens=6, sample_temperature=0.0,
                           eos_token_id=[0, 2], pad_token_id=PAD)
        answer = [t for t, c in zip(seq[0, ids.shape[1]:].tolist(), comp[0, ids.shape[1]:].tolist()) if c and t not in (0, 2)]
        assert r["messages"][-1]["content"] == tok.decode(answer)
