"""data.weights: a weighted pass over conversation and plain-text blocks, deterministic, resumable, refused when bad."""

import json
from collections import Counter

import pytest
import torch

from distillery.config import DataConfig, load_config
from distillery.data import BlockDataset, BlockSampler, block_weights
from distillery.data.build import build_blocks
from distillery.data.loader import pass_items
from distillery.errors import DistilleryError
from distillery.train import distill
from helpers_run import write_recipe
from tiny import corpus_text, tiny_tokenizer

CONV = [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "A player."}]


def test_integer_weights_repeat_each_block_exactly():
    w = torch.tensor([1.0, 3.0, 0.0, 2.0, 3.0], dtype=torch.float64)
    for epoch in (0, 1, 7):
        assert Counter(pass_items(w, seed=4, epoch=epoch).tolist()) == {0: 1, 1: 3, 3: 2, 4: 3}


def test_fractional_share_is_seeded_constant_in_size_and_moves_between_epochs():
    w = torch.full((40,), 1.5, dtype=torch.float64)
    w[:10] = 0.3
    passes = [pass_items(w, seed=2, epoch=e) for e in range(4)]
    assert {len(p) for p in passes} == {30 + 15 + 3}  # 30 blocks at 1.5: each once, 15 of them twice; 10 at 0.3: 3
    for p in passes:
        c = Counter(p.tolist())
        assert all(c[i] in (1, 2) for i in range(10, 40)) and sum(c[i] == 2 for i in range(10, 40)) == 15
        assert sum(c[i] for i in range(10)) == 3 and all(c[i] <= 1 for i in range(10))
    assert torch.equal(passes[1], pass_items(w, seed=2, epoch=1))  # a pure function of (weights, seed, epoch)
    assert not torch.equal(passes[0], passes[1])  # another share each epoch
    assert not torch.equal(passes[0], pass_items(w, seed=3, epoch=0))


def test_weighted_sampler_shuffles_the_pass_and_resumes_by_index():
    w = torch.tensor([2.0] * 4 + [1.0] * 6, dtype=torch.float64)
    s = BlockSampler(10, 2, seed=1, weights=w)
    assert s.n == 14 and len(s) == 7
    order = s.order(3)
    assert Counter(order.tolist()) == Counter(pass_items(w, 1, 3).tolist())
    assert not torch.equal(order, pass_items(w, 1, 3))  # shuffled
    assert [s.indices(3, k).tolist() for k in range(7)] == [order[2 * k:2 * k + 2].tolist() for k in range(7)]
    with pytest.raises(ValueError, match="3 block weights for 10 blocks"):
        BlockSampler(10, 2, weights=w[:3])


def test_no_weights_or_ones_keep_the_unweighted_order_exactly():
    ds = BlockDataset(torch.arange(93, dtype=torch.int32), torch.arange(23) * 4, seq_len=4)
    assert block_weights(ds, {}) is None and block_weights(ds, {"chat": 1.0, "text": 1}) is None
    assert torch.equal(BlockSampler(23, 4, seed=5).order(2), BlockSampler(23, 4, seed=5, weights=None).order(2))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Blocks of a plain-text file and a chat file built together (text blocks first, then conversations)."""
    root = tmp_path_factory.mktemp("mixed")
    (root / "plain.txt").write_text(corpus_text(3000))
    (root / "chat.jsonl").write_text("".join(json.dumps({"messages": CONV}) + "\n" for _ in range(12)))
    ds, _, stats = build_blocks([str(root / "plain.txt"), str(root / "chat.jsonl")], DataConfig(seq_len=32),
                                tiny_tokenizer(), "data.train", progress=False)
    return ds, stats


def test_chat_blocks_are_told_apart_and_survive_a_subset(mixed):
    ds, _ = mixed
    chat = ds.chat_blocks()
    labels = ds.batch(torch.arange(len(ds)))["labels"]
    # a conversation block masks its prompts; a plain-text block has a label everywhere
    assert torch.equal(chat, (labels == -100).any(1)) and 0 < int(chat.sum()) < len(ds)
    order = torch.arange(len(ds)).flip(0)
    assert torch.equal(ds.subset(order).chat_blocks(), chat[order])
    w = block_weights(ds, {"chat": 3})
    assert torch.equal(w, torch.where(chat, 3.0, 1.0).double())
    assert torch.equal(block_weights(ds, {"text": 0.5}), torch.where(chat, 1.0, 0.5).double())


def test_weights_that_leave_nothing_are_one_line(mixed):
    ds, _ = mixed
    text_only = ds.subset(torch.nonzero(~ds.chat_blocks()).flatten())
    with pytest.raises(DistilleryError, match=r"leave none of the \d+ plain-text blocks"):
        block_weights(text_only, {"text": 0})
    with pytest.raises(DistilleryError, match="leave none"):
        block_weights(ds, {"text": 0, "chat": 0})


@pytest.mark.parametrize("bad", ["data.weights.chat=-1", "data.weights.chat=inf", "data.weights.dialog=2"])
def test_bad_weights_are_refused_by_the_config(bad):
    with pytest.raises(DistilleryError, match="data.weights"):
        load_config(None, [bad])


def test_a_run_trains_on_the_weighted_pass_and_resume_keeps_its_weights(tmp_path):
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": CONV}) + "\n" for _ in range(40)))
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path, out)
    cfg = load_config(recipe, [f"data.train=[{tmp_path / 'corpus.txt'},{tmp_path / 'chat.jsonl'}]",
                               "data.weights.text=0", "train.max_steps=3", "train.save_every=3", "train.eval_every=0"])
    seen = []
    import distillery.train as train_mod

    real = train_mod.BlockSampler

    class Spy(real):
        def indices(self, epoch, k, order=None):
            idx = super().indices(epoch, k, order)
            seen.append(idx)
            return idx

    train_mod.BlockSampler = Spy
    try:
        distill(cfg)
    finally:
        train_mod.BlockSampler = real
    assert seen  # every block the run trained on was a conversation block (text weight 0)
    from distillery.run_setup import prepare_run

    run = prepare_run(cfg, device="cpu", is_main=True)
    chat = run.train.chat_blocks()
    assert all(bool(chat[i].all()) for i in seen)
    with pytest.raises(DistilleryError, match="data.weights.text"):
        distill(load_config(recipe, [f"data.train=[{tmp_path / 'corpus.txt'},{tmp_path / 'chat.jsonl'}]",
                                     "data.weights.text=1", "train.max_steps=6", "train.eval_every=0"]), resume=True)


def test_the_kept_order_is_the_epochs_own_and_batches_do_not_share_it():
    w = torch.tensor([2.0] * 4 + [0.5] * 6, dtype=torch.float64)
    for weights in (None, w):
        s = BlockSampler(10, 2, seed=7, weights=weights)
        fresh = [BlockSampler(10, 2, seed=7, weights=weights).order(e) for e in (1, 2)]
        assert [s.order(e).tolist() for e in (1, 2, 1, 2)] == [f.tolist() for f in fresh * 2]
        idx = s.indices(1, 0)
        idx.fill_(-1)  # a caller writing into its indices leaves the epoch's order alone
        assert torch.equal(s.order(1), fresh[0])
