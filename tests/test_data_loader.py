"""distillery.data loader: deterministic order, resume by index, data-parallel shards that add up to the global batch."""

import pytest
import torch

from distillery.data import BlockDataset, BlockSampler, collate, make_loader


@pytest.fixture
def ds():
    # 23 blocks of T=4 over a stream 0..92: block i starts at 4*i, so input_ids[0] identifies the block.
    return BlockDataset(torch.arange(93, dtype=torch.int32), torch.arange(23) * 4, seq_len=4)


def starts(batches):
    return [b["input_ids"][:, 0].div(4, rounding_mode="floor").tolist() for b in batches]


def test_order_is_a_pure_function_of_seed_and_epoch(ds):
    a = starts(make_loader(ds, 4, shuffle=True, seed=1, epoch=2))
    assert a == starts(make_loader(ds, 4, shuffle=True, seed=1, epoch=2))
    assert a != starts(make_loader(ds, 4, shuffle=True, seed=1, epoch=3))
    assert a != starts(make_loader(ds, 4, shuffle=True, seed=2, epoch=2))
    assert len(a) == 5 and all(len(b) == 4 for b in a)  # 23 // 4, the partial batch dropped
    flat = sum(a, [])
    assert len(set(flat)) == 20
    assert starts(make_loader(ds, 4, shuffle=False)) == [list(range(i, i + 4)) for i in range(0, 20, 4)]


def test_batches_carry_index_and_match_collate(ds):
    (b, *_) = make_loader(ds, 3, seed=0)
    assert torch.equal(b["index"], b["input_ids"][:, 0] // 4)
    ref = collate([ds[int(i)] for i in b["index"]])
    assert ref.keys() == b.keys() and all(torch.equal(ref[k], b[k]) for k in b)


def test_resume_skips_ahead_without_reading(ds):
    loader = make_loader(ds, 2, seed=5, epoch=1)
    full = starts(loader)
    assert starts(loader.batches(start=4)) == full[4:]
    assert starts(make_loader(ds, 2, seed=5, epoch=1).batches(start=len(full))) == []


@pytest.mark.parametrize("drop_last", [True, False])
def test_two_ranks_add_up_to_the_single_process_global_batch(ds, drop_last):
    single = starts(make_loader(ds, 6, seed=3, epoch=0, drop_last=drop_last))
    r0 = starts(make_loader(ds, 3, seed=3, epoch=0, rank=0, world_size=2, drop_last=drop_last))
    r1 = starts(make_loader(ds, 3, seed=3, epoch=0, rank=1, world_size=2, drop_last=drop_last))
    assert len(single) == (3 if drop_last else 4)
    for k, glob in enumerate(single):
        part1 = r1[k] if k < len(r1) else []
        assert r0[k] + part1 == glob and not set(r0[k]) & set(part1)
    # the same holds when resuming both ranks at global batch 2
    r0b = starts(make_loader(ds, 3, seed=3, rank=0, world_size=2, drop_last=drop_last).batches(start=2))
    assert r0b == r0[2:]


def test_sampler_validates_sharding():
    with pytest.raises(ValueError):
        BlockSampler(10, 2, rank=2, world_size=2)
    s = BlockSampler(10, 2, world_size=2, rank=1, drop_last=False)
    assert len(s) == 3 and s.indices(0, 2).numel() == 0  # the partial global batch has 2 items: rank 1 gets none
