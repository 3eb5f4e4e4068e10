"""A teacher cache written once in the teacher's tokenization serves a student with another tokenizer
(``distillery.xtok.cached.StudentBlocks``; docs/cross_tokenizer.md).

Pinned: (1) with a cache of k = V the cross-tokenizer loss per token equals the live teacher's on the same student
block (the live targets passed through the cache's log-prob codec: to 1e-5; raw: within the codec's error), the
live path's own teacher view of that student block gives the same loss, and a top-8 cache gives at most the live
loss at 1↔1 positions (top-k + one bucket is a coarse-graining of the exact-string partition, data-processing
inequality); (2) ``distill`` with ``teacher.kind: cache`` + ``student.tokenizer: bpe:N`` trains and validates in
bits per byte; (3) blocks ending inside a character and blocks with special tokens map as documented."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distillery.cli import main
from distillery.config import load_config
from distillery.errors import DistilleryError
from distillery.train import distill
from helpers_run import make_teacher, run_metrics, write_recipe

DATA = {"max_train_blocks": 24, "max_val_blocks": 4}
TRAIN = {"max_steps": 3, "save_every": 0, "eval_every": 0, "eval_batches": 1, "mixed_precision": "no"}
LOSS = {"loss_temperature": 1.0}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny teacher (512-entry byte-level BPE), a 700-entry student BPE, and two caches of the teacher: k = V and
    k = 8 (sqrt_u16 log-probs, no sampled tail), written by ``distillery cache``."""
    from distillery.student_tokenizer import train_bpe
    from helpers_run import make_corpus

    root = tmp_path_factory.mktemp("xcache")
    recipe = write_recipe(root, root / "run", data=DATA, train=TRAIN, loss=LOSS)
    for k in (512, 8):
        assert main(["cache", str(recipe), "--out", str(root / f"cache{k}"), "--k", str(k), "--tail-samples", "0",
                     "--logprob-encoding", "sqrt_u16", "--no-progress"]) == 0
    s_tok = train_bpe([make_corpus(root).read_text()], 700)
    s_tok.save_pretrained(str(root / "student_tok"))
    return root, recipe, s_tok


def _per_token(x, student, batch, view, targets):
    from distillery.xtok.losses import StudentHead, xtok_loss

    hidden = student.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    head = student.get_output_embeddings()
    return xtok_loss(StudentHead(hidden, head.weight, head.bias), targets, view.alignment, x.vmap,
                     student_labels=batch["labels"], teacher_labels=view.batch["labels"], method="exact_kl",
                     span_weight=1.0, loss_temperature=1.0, chunk_size=64, checkpoint=False)


@torch.no_grad()
def test_the_cached_loss_per_token_is_the_live_teachers(world):
    from distillery.cache.codec import Encoding, to_sparse
    from distillery.data import build_datasets
    from distillery.targets import TeacherTargets
    from distillery.teachers import load_teacher
    from distillery.teachers.cached import CachedTeacher
    from distillery.xtok.align import ONE
    from distillery.xtok.batch import CrossTokenizer
    from distillery.xtok.cached import StudentBlocks
    from tiny import tiny_llama

    root, recipe, s_tok = world
    cached, cached8 = CachedTeacher(root / "cache512"), CachedTeacher(root / "cache8")
    live = load_teacher(str(make_teacher(root)))
    t_tok = cached.tokenizer
    x = CrossTokenizer(t_tok, s_tok)
    blocks = StudentBlocks(build_datasets(load_config(recipe).data, t_tok, progress=False).train, x)
    batch = blocks.batch(torch.arange(12))
    view = x.view(batch)  # the precomputed view: the teacher's cached blocks 0..11
    assert torch.equal(view.batch["index"], torch.arange(12))
    student = tiny_llama(vocab_size=len(s_tok), hidden=32, layers=1, seed=3)

    got = _per_token(x, student, batch, view, cached.targets(view.batch, vocab_size=512))
    t_live = live.targets(view.batch, vocab_size=512)
    ids, lp, tail, _, _ = to_sparse(t_live, 512, 1.0, 512)
    enc = cached.reader.encoding  # the live targets through the cache's codec: what the cache must hold
    lp = torch.from_numpy(enc.decode_logprobs(enc.encode_logprobs(lp.numpy())))
    tail = torch.from_numpy(Encoding.decode_tail(Encoding.encode_tail(tail.numpy())))
    want = _per_token(x, student, batch, view, TeacherTargets(topk_ids=ids, topk_logprobs=lp, tail_logprob=tail,
                                                              loss_temperature=1.0, mask=t_live.mask))
    counted = view.alignment.kind != 0
    assert counted.sum() > 0.8 * (batch["labels"] != -100).sum()  # most student targets carry a KD term
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    dense = _per_token(x, student, batch, view, t_live)
    assert float((got - dense).abs().max()) < 2e-4  # sqrt_u16: |Δ log p| <= 1.7e-4 at log p = -4 (Encoding.max_logprob_error)
    assert abs(float(got.sum() - dense.sum())) < 1e-4 * float(dense.sum())

    # The live path (the teacher re-tokenizes the student's bytes, xtok.batch) on the same student blocks: where its
    # tokens are the cached block's, the alignment and the loss are the same.
    plain = {k: batch[k] for k in ("input_ids", "labels", "attention_mask")}
    lview = x.view(plain)
    same = [b for b in range(12) if lview.batch["input_ids"].shape[1] >= 32
            and torch.equal(lview.batch["input_ids"][b, :32], view.batch["input_ids"][b])
            and torch.equal(lview.alignment.kind[b], view.alignment.kind[b])]
    assert len(same) >= 6
    by_live_path = _per_token(x, student, batch, lview, live.targets(lview.batch, vocab_size=512))
    torch.testing.assert_close(by_live_path[same], dense[same], rtol=1e-5, atol=1e-5)

    # Top-8 + one bucket coarse-grains the exact-string partition: at 1-1 positions the KL can only drop.
    got8 = _per_token(x, student, batch, view, cached8.targets(view.batch, vocab_size=512))
    one = view.alignment.kind == ONE
    assert (got8[one] <= dense[one] + 2e-3).all() and (got8[one] >= -1e-6).all()
    assert float(got8[one].sum()) < float(dense[one].sum())


def test_distill_from_a_cache_with_another_student_tokenizer(world, tmp_path):
    root, recipe, _ = world
    out = tmp_path / "run"
    over = ["teacher.kind=cache", f"teacher.cache_path={root / 'cache512'}", "student.tokenizer=bpe:600",
            f"train.output_dir={out}", "train.max_steps=3", "train.lr=1e-2"]
    summary = distill(load_config(recipe, over))
    rec = [m for m in run_metrics(out) if "loss" in m]
    assert [m["step"] for m in rec] == [1, 2, 3]
    assert all(np.isfinite(m["loss"]) and m["kd"] > 0 for m in rec)
    assert rec[-1]["loss"] != rec[0]["loss"]
    val = summary["validation"]
    assert 0 < val["student_bits_per_byte"] < 20 and 0 < val["teacher_bits_per_byte"] < 20
    assert val["aligned_share"] > 0.5 and val["kl_teacher_student"] > 0
    assert val["teacher_label_in_topk"] == 1.0  # k = V: the teacher's bits per byte are exact, not a bound
    from transformers import AutoConfig, AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(str(out / "student"))) == 600  # the student ships its own tokenizer
    assert AutoConfig.from_pretrained(str(out / "student")).vocab_size == 600


def test_cached_cross_tokenizer_refusals_are_one_line(world, tmp_path):
    root, recipe, _ = world
    base = ["teacher.kind=cache", f"teacher.cache_path={root / 'cache512'}", f"student.tokenizer={root / 'student_tok'}",
            f"train.output_dir={tmp_path / 'x'}"]
    with pytest.raises(DistilleryError, match="scores the student's samples"):
        distill(
            load_config(recipe, base + ["generation.on_policy_fraction=0.5"]))
    with pytest.raises(DistilleryError, match="written for another data fingerprint"):
        distill(load_config(recipe, base + ["data.max_train_blocks=20"]))


def _blocks_of(t_tok, s_tok, text: str, seq_len: int = 16):
    from distillery.data.pack import BlockDataset, text_starts
    from distillery.xtok.batch import CrossTokenizer
    from distillery.xtok.cached import StudentBlocks

    ids = t_tok.encode(text)
    ds = BlockDataset(torch.tensor(ids, dtype=torch.int32), torch.from_numpy(text_starts(len(ids), seq_len)), seq_len)
    x = CrossTokenizer(t_tok, s_tok)
    return ds, x, StudentBlocks(ds, x)


def _spell(tok, ids) -> bytes:
    from distillery.xtok.align import spelling

    sp = spelling(tok).spelling
    return b"".join(sp[i] or b"" for i in ids)


def test_blocks_cut_inside_a_character_keep_whole_characters(world):
    from tiny import tiny_tokenizer

    _, _, s_tok = world
    t_tok = tiny_tokenizer(512)
    ds, x, sb = _blocks_of(t_tok, s_tok, "Zoë 🙂🙂 naïve – 你好世界 café déjà vu 🙂 and more " * 6)
    cut = 0
    for i in range(len(sb)):
        raw = _spell(t_tok, ds.tokens[ds.starts[i]:ds.starts[i] + 17].tolist())
        m = sb.mapped(i)
        s_raw = _spell(s_tok, m.ids.tolist())
        s_raw.decode("utf-8")  # whole characters only
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:  # the teacher's block starts or ends inside a character: those bytes are cut
            cut += 1
            assert len(s_raw) < len(raw) and s_raw in raw
            continue
        assert s_raw == raw  # otherwise the student's tokens spell the block's bytes exactly
    assert cut >= 2  # the byte-level teacher splits the emoji and CJK characters


def test_special_tokens_become_the_students_and_are_never_crossed(world):
    from distillery.xtok.align import END, MERGED, NONE, ONE, START
    from distillery.xtok.cached import StudentBlocks
    from tiny import tiny_tokenizer

    _, _, s_tok = world
    t_tok = tiny_tokenizer(512)
    eos_t, eos_s = t_tok.eos_token_id, s_tok.eos_token_id
    text = "And so the king went forth<|endoftext|>and the queen<|endoftext|>stayed at home, and wept. " * 3
    ds, x, sb = _blocks_of(t_tok, s_tok, text)
    seen = 0
    for i in range(len(sb)):
        t_row = ds.tokens[ds.starts[i]:ds.starts[i] + 17].tolist()
        m = sb.mapped(i)
        ids = m.ids.tolist()
        assert ids.count(eos_s) == t_row.count(eos_t)  # one student EOS for each teacher EOS, in place
        if eos_t not in t_row[1:]:
            continue
        seen += 1
        # the text between EOS tokens is the teacher's, re-tokenized on its own (never merged across the EOS)
        t_segs = [_spell(t_tok, s) for s in _split(t_row, eos_t)]
        s_segs = [_spell(s_tok, s) for s in _split(ids, eos_s)]
        assert s_segs == t_segs  # (ASCII text: no character cut at the edges)
        k = ids.index(eos_s)
        if k >= 1:
            assert m.labels[k - 1] == eos_s  # the student learns to end a document where the teacher does
            assert m.kind[k - 1] == NONE  # specials are never aligned: CE only
    assert seen >= 3
    batch = sb.batch(torch.arange(len(sb)))
    assert batch["teacher_input_ids"].shape == (len(sb), 16)
    assert (batch["labels"] == eos_s).sum() == (batch["teacher_labels"] == eos_t).sum()
    short = StudentBlocks(ds, x, max_len=6)  # the student's position limit cuts rows; cut spans are not aligned
    for i in range(len(sb)):
        full, cut = sb.mapped(i), short.mapped(i)
        assert cut.n_labels == min(full.n_labels, 6) and np.array_equal(cut.ids, full.ids[:7])
        assert (cut.kind == START).sum() == (cut.kind == END).sum()
        kept = cut.kind != NONE
        assert np.array_equal(cut.kind[kept], full.kind[:6][kept])  # a kept span is the same span
        single = np.isin(full.kind[:6], (ONE, MERGED))
        assert np.array_equal(cut.kind[single], full.kind[:6][single])  # one-student-token spans are all kept


def _split(ids: list[int], sep: int) -> list[list[int]]:
    out = [[]]
    for i in ids:
        if i == sep:
            out.append([])
        else:
            out[-1].append(i)
    return out


def test_packed_conversations_keep_their_targets_and_positions(world, tmp_path):
    import json

    from distillery.config import DataConfig
    from distillery.data import build_datasets
    from distillery.xtok.batch import CrossTokenizer
    from distillery.xtok.cached import StudentBlocks
    from tiny import tiny_tokenizer

    _, _, s_tok = world
    t_tok = tiny_tokenizer(512)
    convs = [[{"role": "user", "content": f"Who art thou, {n}?"}, {"role": "assistant", "content": f"A poor player, {n}."}]
             for n in ("Hamlet", "Zoë", "Ophelia", "Yorick", "café")]
    chat = tmp_path / "c.jsonl"
    chat.write_text("".join(json.dumps({"messages": m}) + "\n" for m in convs))
    ds = build_datasets(DataConfig(train=[str(chat)], seq_len=128, val_fraction=0.0), t_tok, progress=False).train
    sb = StudentBlocks(ds, CrossTokenizer(t_tok, s_tok))
    b = sb.batch(torch.arange(len(sb)))
    im_start_s = s_tok.convert_tokens_to_ids("<|im_start|>")
    for r in range(len(sb)):
        t_lab, s_lab = b["teacher_labels"][r], b["labels"][r]
        # the student learns exactly the teacher's target text: the assistant answers and their <|im_end|>
        assert (t_tok.decode(t_lab[t_lab != -100].tolist(), skip_special_tokens=False)
                == s_tok.decode(s_lab[s_lab != -100].tolist(), skip_special_tokens=False))
        n = int(b["attention_mask"][r].sum())
        ids, pos = b["input_ids"][r, :n], b["position_ids"][r, :n]
        assert torch.equal(ids[pos == 0], torch.full_like(ids[pos == 0], im_start_s))  # a conversation starts there
        t_starts = (b["teacher_position_ids"][r] == 0) & (b["teacher_attention_mask"][r] == 1)
        assert int((pos == 0).sum()) == int(t_starts.sum()) >= 1  # the same conversations, each restarting at 0
    assert any(int((b["position_ids"][r, :int(b["attention_mask"][r].sum())] == 0).sum()) > 1 for r in range(len(sb)))


def test_a_stray_byte_keeps_the_text_around_it(world):
    """A teacher block with a byte that spells no text (a byte-fallback token out of order): the valid text on
    either side is read and aligned (as the live path's ``text_row`` reads it); only the stray byte is lost."""
    from distillery.data.pack import BlockDataset
    from distillery.xtok.align import spelling
    from distillery.xtok.batch import CrossTokenizer
    from distillery.xtok.cached import StudentBlocks
    from tiny import tiny_tokenizer

    _, _, s_tok = world
    t_tok = tiny_tokenizer(512)
    stray = spelling(t_tok).spelling.index(b"\xff")
    left, right = t_tok.encode("the king and"), t_tok.encode(" the queen said")
    ids = left + [stray] + right
    ds = BlockDataset(torch.tensor(ids, dtype=torch.int32), torch.tensor([0]), len(ids) - 1)
    m = StudentBlocks(ds, CrossTokenizer(t_tok, s_tok)).mapped(0)
    assert _spell(s_tok, m.ids.tolist()) == b"the king and the queen said"   # both runs, the byte skipped
    assert (m.kind > 0).sum() >= 4                                         # and aligned on both sides of it
    first = np.asarray(m.teacher_first)[np.asarray(m.kind) > 0]
    assert first.min() < len(left) - 1 and first.max() > len(left)
