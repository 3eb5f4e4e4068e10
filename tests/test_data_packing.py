"""distillery.data packing: shifted labels, EOS joins, exact piecewise tokenization, chat masks, split, fingerprint."""

import copy
import json
import warnings

import pytest
import torch

from distillery.config import DataConfig
from distillery.data import build_datasets, permutation, tokenizer_hash
from distillery.data.build import build_blocks
from distillery.data.pack import best_fit
from distillery.data.chat import render_chat
from distillery.data.readers import Record
from distillery.data.split import split_blocks
from distillery.data.tokenize import encode_batch, split_pieces, tokenize_documents
from distillery.errors import DistilleryError
from tiny import corpus_text, tiny_tokenizer

CONVS = [
    [{"role": "user", "content": "Who art thou?"}, {"role": "assistant", "content": "A poor player."}],
    [{"role": "system", "content": "Speak in verse."}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Good morrow, friend."}, {"role": "user", "content": "Farewell"},
     {"role": "assistant", "content": "Parting is such sweet sorrow."}],
    [{"role": "user", "content": "And then?"}, {"role": "assistant", "content": "The rest is silence."}],
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def chat_file(tmp_path, convs=CONVS, name="c.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps({"messages": m}) + "\n" for m in convs))
    return p


def test_text_blocks_are_shifted_and_join_documents_with_eos(tmp_path, tok):
    docs = [corpus_text(3000)[i * 1000:(i + 1) * 1000] for i in range(3)]
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    ds, files, stats = build_blocks([str(p)], DataConfig(seq_len=16), tok, "data.train", progress=False)
    eos = tok.eos_token_id
    stream = sum((tok(d, add_special_tokens=False)["input_ids"] + [eos] for d in docs), [])
    assert stats["text_tokens"] == len(stream) and len(ds) == (len(stream) - 1) // 16
    b = ds.batch(torch.arange(len(ds)))
    assert b["input_ids"].shape == b["labels"].shape == (len(ds), 16) and b["input_ids"].dtype == torch.int64
    assert torch.equal(b["labels"][:, :-1], b["input_ids"][:, 1:])  # labels[t] == input_ids[t+1]
    assert torch.equal(b["labels"][:-1, -1], b["input_ids"][1:, 0])  # stride T: every token is a target once
    assert b["input_ids"].flatten().tolist() == stream[:16 * len(ds)]
    assert bool((b["attention_mask"] == 1).all()) and torch.equal(b["index"], torch.arange(len(ds)))
    item = ds[3]
    assert all(torch.equal(item[k], b[k][3]) for k in ("input_ids", "labels", "attention_mask", "index"))


def test_piecewise_tokenization_equals_one_call(tok):
    text = corpus_text(60_000)
    pieces = split_pieces(text, 300)
    assert "".join(pieces) == text and len(pieces) > 100
    whole = tok(text, add_special_tokens=False)["input_ids"]
    assert sum(encode_batch(tok, pieces), []) == whole
    assert tokenize_documents([text], tok, progress=False).tolist() == whole + [tok.eos_token_id]


def assistant_text(convs):
    return "".join(m["content"] + "<|im_end|>" for c in convs for m in c if m["role"] == "assistant")


def test_chat_labels_cover_only_assistant_tokens(tmp_path, tok):
    ds, _, stats = build_blocks([str(chat_file(tmp_path))], DataConfig(seq_len=128), tok, "data.train", progress=False)
    assert stats["chat_mask"] == "generation tags" and stats["conversations"] == 3
    b = ds.batch(torch.arange(len(ds)))
    targets = [t for row in b["labels"].tolist() for t in row if t != -100]
    lens = [len(render_chat(Record("c", 1, messages=m), tok)[0]) for m in CONVS]
    placed = [CONVS[i] for block in best_fit(lens, 129) for i in block]  # the blocks' order of conversations
    assert tok.decode(targets) == assistant_text(placed)
    for row_ids, row_labels in zip(b["input_ids"], b["labels"]):  # targets are still the next token
        keep = row_labels[:-1] != -100
        assert torch.equal(row_labels[:-1][keep], row_ids[1:][keep])


def test_best_fit_decreasing_by_hand():
    # next fit in this order needs 4 blocks of 8 ([6] [3] [6] [3 2 2]); best fit decreasing 3, worked by hand:
    # 6 -> A (room 2), 6 -> B (2), 3 -> C (5), 3 -> C (2), 2 -> the last opened of A, B, C with room 2: C (0), 2 -> B (0)
    assert best_fit([6, 3, 6, 3, 2, 2], 8) == [[0], [2, 5], [1, 3, 4]]
    assert best_fit([], 8) == [] and best_fit([8, 8], 8) == [[0], [1]]


def test_chat_padding_and_greedy_packing(tmp_path, tok):
    ds, _, _ = build_blocks([str(chat_file(tmp_path))], DataConfig(seq_len=128), tok, "data.train", progress=False)
    lens = [len(render_chat(Record("c", 1, messages=m), tok)[0]) for m in CONVS]
    b = ds.batch(torch.arange(len(ds)))
    real = b["attention_mask"].sum(1).tolist()
    # best fit decreasing, each block holds whole conversations
    expect = [sum(lens[i] for i in members) for members in best_fit(lens, 129)]
    assert len(expect) == len(ds) >= 2 and real == [min(e, 128) for e in expect]  # input_ids hold T of T+1
    assert sorted(sum(best_fit(lens, 129), [])) == list(range(len(lens)))  # each conversation once
    pad = b["attention_mask"] == 0
    assert bool((b["input_ids"][pad] == tok.pad_token_id).all()) and bool((b["labels"][pad] == -100).all())


def test_prefix_rendering_matches_generation_tags(tok):
    plain = copy.deepcopy(tok)
    plain.chat_template = tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    for m in CONVS:
        rec = Record("c.jsonl", 1, messages=m)
        tagged = render_chat(rec, tok, use_tags=True)
        assert render_chat(rec, plain) == tagged  # auto-detects: no tags -> prefix rendering
        assert render_chat(rec, tok, use_tags=False) == tagged


def test_prefix_rendering_rejects_inconsistent_template(tok):
    odd = copy.deepcopy(tok)
    odd.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(DistilleryError, match=r"c.jsonl:7: .*assistant turn 1 cannot be located"):
        render_chat(Record("c.jsonl", 7, messages=CONVS[0]), odd)


def test_long_conversation_truncated_with_warning(tmp_path, tok):
    long = [{"role": "user", "content": "Speak."}, {"role": "assistant", "content": corpus_text(2000)}]
    only_user_kept = [{"role": "user", "content": corpus_text(3000)}, {"role": "assistant", "content": "Ay."}]
    p = chat_file(tmp_path, [long, CONVS[0], only_user_kept])
    with pytest.warns(UserWarning, match=r"2 of 3 conversations are longer .* truncated; 1 lost every assistant"):
        ds, _, stats = build_blocks([str(p)], DataConfig(seq_len=32), tok, "data.train", progress=False)
    assert (stats["truncated"], stats["dropped"], len(ds)) == (2, 1, 2)
    b = ds.batch(torch.arange(2))
    assert b["input_ids"].shape == (2, 32) and int(b["attention_mask"][0].sum()) == 32


def test_split_is_deterministic_disjoint_and_capped(tmp_path, tok):
    (tmp_path / "a.txt").write_text(corpus_text(20_000))
    cfg = DataConfig(train=[str(tmp_path / "a.txt")], seq_len=32, val_fraction=0.1, seed=3)
    s1, s2 = build_datasets(cfg, tok, progress=False), build_datasets(cfg, tok, progress=False)
    assert s1.fingerprint == s2.fingerprint and json.loads(json.dumps(s1.fingerprint)) == s1.fingerprint
    assert torch.equal(s1.train.starts, s2.train.starts) and torch.equal(s1.val.starts, s2.val.starts)
    tr, va = set(s1.train.starts.tolist()), set(s1.val.starts.tolist())
    n = len(s1.train) + len(s1.val)
    assert not tr & va and len(tr | va) == n and len(s1.val) == round(0.1 * n)
    capped = build_datasets(cfg.model_copy(update={"max_train_blocks": 5, "max_val_blocks": 2}), tok, progress=False)
    assert torch.equal(capped.train.starts, s1.train.starts[:5]) and torch.equal(capped.val.starts, s1.val.starts[:2])
    other = build_datasets(cfg.model_copy(update={"seed": 4}), tok, progress=False)
    assert not torch.equal(other.val.starts, s1.val.starts)


PINNED = [0, 9, 1, 6, 3, 5, 4, 2, 8, 7]


def test_permutation_is_pinned():
    # SplitMix64 hash order: the same on every machine and torch/NumPy version.
    assert permutation(10, 0).tolist() == PINNED
    assert sorted(permutation(1000, 7, stream=3).tolist()) == list(range(1000))
    assert not torch.equal(permutation(50, 0), permutation(50, 0, stream=1))
    with pytest.raises(DistilleryError, match="too few to hold out"):
        split_blocks(1, 0.5, 0)


def test_validation_files_and_fingerprint(tmp_path, tok):
    (tmp_path / "a.txt").write_text(corpus_text(8000))
    (tmp_path / "v.txt").write_text(corpus_text(12_000)[8000:])
    cfg = DataConfig(train=[str(tmp_path / "a.txt")], validation=[str(tmp_path / "v.txt")], seq_len=32)
    s = build_datasets(cfg, tok, progress=False)
    fp = s.fingerprint
    assert fp["split"]["mode"] == "files" and fp["blocks"] == {"train": len(s.train), "val": len(s.val)}
    assert fp["validation_files"][0]["path"] == str(tmp_path / "v.txt") and fp["tokenizer"] == tokenizer_hash(tok)
    assert sorted(s.train.starts.tolist()) == list(range(0, 32 * len(s.train), 32))  # val_fraction ignored
    (tmp_path / "a.txt").write_text(corpus_text(8000).upper())
    assert build_datasets(cfg, tok, progress=False).fingerprint["files"] != fp["files"]
    assert tokenizer_hash(tiny_tokenizer(vocab_size=300)) != tokenizer_hash(tok)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tokenizer_hash(tiny_tokenizer()) == tokenizer_hash(tok)  # a fresh copy hashes the same


def test_text_and_chat_files_mix(tmp_path, tok):
    (tmp_path / "a.txt").write_text(corpus_text(2000))
    p = chat_file(tmp_path)
    ds, files, stats = build_blocks([str(tmp_path / "a.txt"), str(p)], DataConfig(seq_len=128), tok, "data.train",
                                    progress=False)
    assert [f["format"] for f in files] == ["text", "chat"]
    n_text = (stats["text_tokens"] - 1) // 128
    b = ds.batch(torch.arange(len(ds)))
    assert len(ds) == n_text + 2 and bool((b["labels"][:n_text] != -100).all())  # text blocks: every position
    targets = [t for row in b["labels"][n_text:].tolist() for t in row if t != -100]
    assert tok.decode(targets) == assistant_text(CONVS)
