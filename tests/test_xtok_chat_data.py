"""Chat data across tokenizers in the pipeline (xtok.chat_data): the student packs its own rendering of every
conversation, the teacher's view of a block holds the teacher's rendering of the same conversations, and the
alignment of a packed block is each conversation's own alignment, shifted to where it starts on either side."""

from __future__ import annotations

import torch

from distillery.data.pack import BlockDataset, pack_chat
from distillery.data.readers import Record
from distillery.xtok import NONE, align_chat
from distillery.xtok.batch import CrossTokenizer
from distillery.xtok.chat_data import CrossChatRenderer
from xtok_tokenizers import hand_byte_level, hand_metaspace

CONVS = [
    [{"role": "user", "content": "Say"}, {"role": "assistant", "content": "hello world"}],
    [{"role": "user", "content": "Say"}, {"role": "assistant", "content": "Say hello"},
     {"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}],
]


def _packed(seq_len=80):
    t_tok, s_tok = hand_byte_level(), hand_metaspace()  # ChatML teacher, Zephyr-style student
    r = CrossChatRenderer(t_tok, s_tok)
    triples = [r(Record("chat.jsonl", i + 1, messages=m)) for i, m in enumerate(CONVS)]
    packed = pack_chat([(ids, mask) for ids, mask, _ in triples], seq_len, s_tok.pad_token_id or 0,
                       rows=[rows for _, _, rows in triples])
    ds = BlockDataset(torch.from_numpy(packed["tokens"]), torch.from_numpy(packed["starts"]), seq_len,
                      targets=torch.from_numpy(packed["targets"]), real=torch.from_numpy(packed["real"]),
                      teacher_rows=torch.from_numpy(packed["rows"]), positions=torch.from_numpy(packed["positions"]))
    return t_tok, s_tok, r, ds


def _view(r, batch):
    x = CrossTokenizer(r.teacher_tokenizer, r.student_tokenizer)
    x.use_chat(r)
    return x.view(batch)


def test_the_student_side_is_the_students_own_rendering():
    t_tok, s_tok, r, ds = _packed()
    assert len(ds) == 1  # both conversations fit one block
    batch = ds.batch([0])
    ref = [align_chat(m, t_tok, s_tok) for m in CONVS]
    n1, n2 = len(ref[0].student_ids), len(ref[1].student_ids)
    assert batch["input_ids"][0, :n1 + n2 - 1].tolist() == (ref[0].student_ids + ref[1].student_ids)[:-1]
    assert "<|user|>" in s_tok.decode(ref[0].student_ids)  # the student's template, not the teacher's
    assert r.end_pairs == ((t_tok.convert_tokens_to_ids("<|im_end|>"), s_tok.convert_tokens_to_ids("</s>")),)


def test_the_teacher_view_of_a_packed_block_is_each_conversation_in_its_own_template():
    t_tok, s_tok, r, ds = _packed()
    batch = ds.batch([0])
    view = _view(r, batch)
    ref = [align_chat(m, t_tok, s_tok) for m in CONVS]
    t1, t2 = len(ref[0].teacher_ids), len(ref[1].teacher_ids)
    s1, s2 = len(ref[0].student_ids), len(ref[1].student_ids)
    n = t1 + t2 - 1  # the row's teacher tokens; the batch is right-padded to a multiple of 16, masked, no targets
    tb = {k: v[:, :n] for k, v in view.batch.items()}
    assert view.batch["input_ids"].shape[1] % 16 == 0 and int(view.batch["attention_mask"][0].sum()) == n
    assert (view.batch["labels"][0, n:] == -100).all()
    assert tb["input_ids"][0].tolist() == (ref[0].teacher_ids + ref[1].teacher_ids)[:-1]
    assert "<|im_start|>" in t_tok.decode(tb["input_ids"][0].tolist())
    # positions restart where the second conversation starts (each conversation sees only itself)
    assert tb["position_ids"][0].tolist() == list(range(t1)) + list(range(t2 - 1))
    # the teacher's labels are its assistant tokens only
    want = torch.tensor((ref[0].teacher_ids + ref[1].teacher_ids)[1:])
    mask = torch.tensor((ref[0].teacher_mask + ref[1].teacher_mask)[1:], dtype=torch.bool)
    assert torch.equal(tb["labels"][0], want.masked_fill(~mask, -100))
    # the block's alignment: conversation 1's own, then NONE at the label of conversation 2's first token,
    # then conversation 2's own with teacher positions shifted by conversation 1's teacher length
    al, a1, a2 = view.alignment, ref[0].alignment(), ref[1].alignment()
    T = batch["input_ids"].shape[1]
    assert torch.equal(al.kind[0, :s1 - 1], a1.kind[0])
    assert int(al.kind[0, s1 - 1]) == NONE
    assert torch.equal(al.kind[0, s1:s1 + s2 - 1], a2.kind[0])
    assert (al.kind[0, s1 + s2 - 1:] == NONE).all() and al.kind.shape == (1, T)
    on2 = a2.kind[0] != NONE
    assert torch.equal(al.teacher_first[0, s1:s1 + s2 - 1][on2], a2.teacher_first[0][on2] + t1)
    assert torch.equal(al.student_first[0, s1:s1 + s2 - 1][on2], a2.student_first[0][on2] + s1)
    assert al.teacher_len == -(-(t1 + t2 - 1) // 16) * 16  # the teacher batch is padded to a multiple of 16
    assert int((al.kind != NONE).sum()) == int((a1.kind != NONE).sum() + (a2.kind != NONE).sum())


def test_a_conversation_cut_at_the_block_keeps_only_spans_inside_it():
    t_tok, s_tok, r, _ = _packed()
    long = [{"role": "user", "content": "Say"}, {"role": "assistant", "content": " ".join(["hello world"] * 12)}]
    ids, mask, rows = r(Record("chat.jsonl", 9, messages=long))
    seq_len = len(ids) // 2
    packed = pack_chat([(ids, mask)], seq_len, 0, rows=[rows])
    assert packed["truncated"] == 1
    ds = BlockDataset(torch.from_numpy(packed["tokens"]), torch.from_numpy(packed["starts"]), seq_len,
                      targets=torch.from_numpy(packed["targets"]), real=torch.from_numpy(packed["real"]),
                      teacher_rows=torch.from_numpy(packed["rows"]), positions=torch.from_numpy(packed["positions"]))
    view = _view(r, ds.batch([0]))
    full = align_chat(long, t_tok, s_tok).alignment()
    assert view.alignment.kind.shape == (1, seq_len)
    kept = view.alignment.kind[0] != NONE
    assert kept.sum() > 0
    # inside the cut the alignment is the whole conversation's, except a span the cut splits (dropped)
    same = view.alignment.kind[0] == full.kind[0, :seq_len]
    assert same[kept].all()
    assert int((~same).sum()) <= 2


def test_text_rows_beside_chat_rows_take_the_byte_view():
    t_tok, s_tok, r, ds = _packed()
    chat = ds.batch([0])
    ids = s_tok.encode("Say hello world, say hello", add_special_tokens=False)
    T = chat["input_ids"].shape[1]
    text = {"input_ids": torch.tensor([ids[:-1] + [0] * (T - len(ids) + 1)]),
            "labels": torch.tensor([ids[1:] + [-100] * (T - len(ids) + 1)]),
            "attention_mask": torch.tensor([[1] * (len(ids) - 1) + [0] * (T - len(ids) + 1)]),
            "teacher_row": torch.full((1, T), -1)}
    both = {k: torch.cat([chat[k], text[k]]) for k in text}
    view = _view(r, both)
    alone = CrossTokenizer(t_tok, s_tok).view({k: text[k] for k in ("input_ids", "labels", "attention_mask")})
    n = int(alone.batch["attention_mask"].sum())
    assert view.batch["input_ids"][1, :n].tolist() == alone.batch["input_ids"][0, :n].tolist()
    assert view.batch["position_ids"][1, :n].tolist() == list(range(n))  # a text row counts from 0
    assert torch.equal(view.alignment.kind[1], alone.alignment.kind[0])
    assert t_tok.decode(alone.batch["input_ids"][0, :n].tolist() + [int(alone.batch["labels"][0, n - 1])]).strip() \
        == "Say hello world, say hello"


def _chat_file(tmp_path, n_lines: int):
    """Conversations made of corpus lines: a system prompt, a line as the question, the next as the answer."""
    import json

    from helpers_run import make_corpus

    lines = [x.strip() for x in make_corpus(tmp_path).read_text().splitlines() if len(x.strip()) > 20][:n_lines]
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [
        {"role": "system", "content": "Answer in verse."}, {"role": "user", "content": lines[i]},
        {"role": "assistant", "content": lines[i + 1]}]}) + "\n" for i in range(0, len(lines) - 1, 2)))
    return chat


def test_a_run_on_chat_data_shows_the_teacher_its_own_template(tmp_path):
    from distillery.config import load_config
    from distillery.run_setup import prepare_run
    from distillery.train import distill
    from helpers_run import run_metrics, write_recipe

    chat = _chat_file(tmp_path, 60)
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path, out, data={"train": [str(chat)], "seq_len": 96, "val_fraction": 0.1},
                          student={"tokenizer": "bpe:600"},
                          train={"max_steps": 3, "save_every": 0, "eval_every": 0, "eval_batches": 1,
                                 "mixed_precision": "no"})
    cfg = load_config(recipe)
    run = prepare_run(cfg, torch.device("cpu"))
    assert run.xtok.chat is not None and len(run.xtok.chat.conversations) == 30
    batch = run.train.batch([0, 1])
    view = run.xtok.view(batch)
    t_tok = run.xtok.teacher_tokenizer
    text = t_tok.decode(view.batch["input_ids"][0].tolist())
    assert text.startswith("<|im_start|>system\nAnswer in verse.<|im_end|>")  # the teacher's own rendering
    aligned = view.alignment.kind != NONE
    assert aligned.sum() > 20
    assert (batch["labels"][aligned] != -100).all()  # only assistant positions are aligned
    t_labels = view.batch["labels"]
    assert (t_labels != -100).sum() < t_labels.numel() / 2  # the teacher's targets are its assistant tokens only
    distill(cfg)
    steps = [m for m in run_metrics(out) if "loss" in m]
    assert len(steps) == 3 and all(0 < m["kd"] < 50 for m in steps)


def test_on_policy_samples_of_chat_prompts_follow_the_teachers_rendering_of_the_prompt(tmp_path):
    from distillery.config import load_config
    from distillery.onpolicy import on_policy_batch
    from distillery.run_setup import prepare_run
    from distillery.train import distill
    from helpers_run import run_metrics, write_recipe

    chat = _chat_file(tmp_path, 40)
    out = tmp_path / "run"
    gen = {"on_policy_fraction": 1.0, "max_new_tokens": 10, "sample_temperature": 1.0}
    cfg = load_config(write_recipe(tmp_path, out, data={"train": [str(chat)], "seq_len": 96, "val_fraction": 0.1},
                                   student={"tokenizer": "bpe:600"}, generation=gen,
                                   train={"max_steps": 2, "save_every": 0, "eval_every": 0, "eval_batches": 1,
                                          "mixed_precision": "no"}))
    run = prepare_run(cfg, torch.device("cpu"))
    batch = run.train.batch([0, 1])
    sampled = on_policy_batch(run.student, batch, run.tokenizer, cfg.generation,
                              generator=torch.Generator().manual_seed(0), vocab_size=run.vocab_size)
    view = run.xtok.view(sampled)
    t_tok, s_tok = run.xtok.teacher_tokenizer, run.xtok.student_tokenizer
    for b in range(2):
        p, n = int(sampled["prompt_len"][b]), int(sampled["attention_mask"][b].sum())
        m = int(view.batch["attention_mask"][b].sum()) + 1
        t_row = view.batch["input_ids"][b, :m - 1].tolist() + [int(view.batch["labels"][b, m - 2])]
        text = t_tok.decode(t_row)
        # the teacher's own rendering of the prompt, up to its assistant header, then the student's sample as text
        assert text.startswith("<|im_start|>system\nAnswer in verse.<|im_end|>\n<|im_start|>user\n")
        head = text.index("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")
        sample = s_tok.decode(sampled["input_ids"][b, p:n].tolist(), skip_special_tokens=True).replace("\ufffd", "")
        assert t_tok.decode(t_row, skip_special_tokens=True).endswith(sample.rstrip()[-10:])
        assert head <= len(text)
        aligned = (view.alignment.kind[b] != NONE).nonzero().squeeze(-1)
        assert aligned.numel() > 0 and int(aligned.min()) >= p - 1  # only the sample's tokens are aligned
    distill(cfg)
    steps = [m for m in run_metrics(out) if "loss" in m]
    assert len(steps) == 2 and all(0 < m["kd"] < 50 for m in steps)


def test_a_sample_that_repeats_the_conversation_gets_the_conversations_own_alignment():
    t_tok, s_tok, r, ds = _packed()
    ref = align_chat(CONVS[0], t_tok, s_tok)
    p = ref.student_mask.index(1)  # the prompt: up to the first assistant token
    s_ids = ref.student_ids[:ref.student_mask.index(1) + sum(ref.student_mask)]  # content + "</s>"
    assert s_tok.convert_ids_to_tokens(s_ids[-1]) == "</s>"
    T = len(s_ids) - 1
    rows = ds.batch([0])["teacher_row"][:, :T].masked_fill(torch.arange(T)[None] >= p - 1, -1)
    sampled = {"input_ids": torch.tensor([s_ids]), "labels": torch.tensor([[-100] * (p - 1) + s_ids[p:] + [-100]]),
               "attention_mask": torch.ones(1, len(s_ids), dtype=torch.long), "teacher_row":
               torch.cat([rows, torch.full((1, 1), -1)], 1), "prompt_len": torch.tensor([p])}
    view = _view(r, sampled)
    t_end = ref.teacher_mask.index(1) + sum(ref.teacher_mask)  # the teacher's rendering through its <|im_end|>
    n = int(view.batch["attention_mask"][0].sum())  # the teacher's tokens (the batch is padded to a multiple of 16)
    got = view.batch["input_ids"][0, :n].tolist() + [int(view.batch["labels"][0, n - 1])]
    assert got == ref.teacher_ids[:t_end]
    want = ref.alignment()
    assert torch.equal(view.alignment.kind[0, :T], want.kind[0, :T])
    assert torch.equal(view.alignment.teacher_first[0, :T], want.teacher_first[0, :T])


def test_an_on_policy_sample_of_a_text_block_beside_chat_data_takes_the_byte_view():
    t_tok, s_tok, r, _ = _packed()
    ids = s_tok.encode("Say hello world, say hello", add_special_tokens=False)
    n = len(ids)
    sampled = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([[-100] * 3 + ids[4:] + [-100]]),
               "attention_mask": torch.ones(1, n, dtype=torch.long), "teacher_row": torch.full((1, n), -1),
               "prompt_len": torch.tensor([4])}
    view = _view(r, sampled)
    plain = CrossTokenizer(t_tok, s_tok).view({k: sampled[k] for k in ("input_ids", "labels", "attention_mask")})
    assert torch.equal(view.batch["input_ids"], plain.batch["input_ids"])
    assert torch.equal(view.alignment.kind, plain.alignment.kind) and int((view.alignment.kind != NONE).sum()) > 0
