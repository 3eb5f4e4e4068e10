"""Packed conversations are kept apart: a token's hidden states (student and in-process teacher) do not change when
another conversation in its block changes, and equal those of the conversation alone in a block of its own.
Plain text batches carry no position_ids and go through the model exactly as before."""

from __future__ import annotations

import json

import numpy as np
import torch

from distillery.config import DataConfig
from distillery.data import BlockDataset, build_datasets
from distillery.data.pack import document_positions, model_inputs, pack_chat
from distillery.evaluate import student_hidden
from distillery.teachers.hf import HFTeacher
from tiny import corpus_text, tiny_llama, tiny_tokenizer

T = 48


def block(convs: list[list[int]]) -> dict:
    """One packed block of conversations (every token a target), as the data pipeline batches it."""
    packed = pack_chat([(ids, [1] * len(ids)) for ids in convs], T, pad_id=3)
    assert len(packed["starts"]) == 1
    ds = BlockDataset(torch.from_numpy(packed["tokens"]), torch.from_numpy(packed["starts"]), T,
                      targets=torch.from_numpy(packed["targets"]), real=torch.from_numpy(packed["real"]),
                      positions=torch.from_numpy(packed["positions"]))
    return ds.batch([0])


def test_positions_restart_per_conversation_and_padding():
    assert document_positions([3, 2], 7).tolist() == [0, 1, 2, 0, 1, 0, 1]
    b = block([[10, 11, 12], [20, 21]])
    assert b["position_ids"][0, :8].tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert set(model_inputs(b)) == {"input_ids", "position_ids", "use_cache"}


@torch.no_grad()
def test_a_token_cannot_see_another_conversation():
    model = tiny_llama(vocab_size=128, hidden=64, layers=2, seed=3).eval()
    a, a2, b = [5, 6, 7, 8, 9, 10, 11], [40, 41, 42, 43, 44], [60, 61, 62, 63, 64, 65]
    h1 = student_hidden(model, block([a, b]))[0]  # (T, H)
    h2 = student_hidden(model, block([a2, b]))[0]  # the first conversation replaced (another length too)
    alone = student_hidden(model, block([b]))[0]
    torch.testing.assert_close(h1[len(a):len(a) + len(b)], h2[len(a2):len(a2) + len(b)], rtol=0, atol=1e-5)
    torch.testing.assert_close(h1[len(a):len(a) + len(b)], alone[:len(b)], rtol=0, atol=1e-5)
    # the old path (attention mask only) lets b attend to a: the check above would have failed
    batch = block([a, b])
    leaky = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state[0]
    assert (leaky[len(a):len(a) + len(b)] - alone[:len(b)]).abs().max() > 1e-2
    # the in-process teacher keeps them apart the same way
    teacher = HFTeacher(model=model, tokenizer=None, name="t", source="t", device=torch.device("cpu"))
    t1, t2 = teacher.targets(block([a, b])).hidden[0], teacher.targets(block([a2, b])).hidden[0]
    torch.testing.assert_close(t1[len(a):len(a) + len(b)], t2[len(a2):len(a2) + len(b)], rtol=0, atol=1e-5)


@torch.no_grad()
def test_plain_text_is_unchanged_and_mixed_text_counts_from_zero(tmp_path):
    tok = tiny_tokenizer()
    text = tmp_path / "t.txt"
    text.write_text(corpus_text(20_000))
    plain = build_datasets(DataConfig(train=[str(text)], seq_len=32, val_fraction=0.0), tok, progress=False)
    batch = plain.train.batch([0, 1])
    assert "position_ids" not in batch and "packing" not in plain.fingerprint
    model = tiny_llama(vocab_size=512, seed=1).eval()
    before = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert torch.equal(student_hidden(model, batch), before)  # the default path: same call, same numbers
    chat = tmp_path / "c.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Q{i}"},
                                                     {"role": "assistant", "content": f"A{i}."}]}) + "\n"
                            for i in range(20)))
    mixed = build_datasets(DataConfig(train=[str(text), str(chat)], seq_len=32, val_fraction=0.0), tok, progress=False)
    assert mixed.fingerprint["packing"] == "per-conversation attention, best fit decreasing"
    pos = mixed.train.batch(torch.arange(len(mixed.train)))["position_ids"]  # (n, T)
    assert (pos[:, 0] == 0).all()  # every block starts a document
    is_text = (pos == torch.arange(32)).all(dim=1)
    assert 0 < int(is_text.sum()) < len(pos)  # text blocks count 0..T-1; chat blocks restart inside
    assert np.array_equal(mixed.train.positions[:64].numpy(), np.arange(64) % 32)  # the text stream comes first
