"""The cache writer computes the teacher's head, softmax and tail draws on the target rows only
(``to_sparse(rows=...)``): the kept rows equal a computation over every row and the others are zeros. Through the
writer (blocks with masked prompts) the cache still equals the live loss: tests/test_cache.py."""

from __future__ import annotations

import numpy as np
import torch

from distillery.cache.codec import to_sparse
from distillery.cache.sampling import tail_uniforms
from distillery.targets import TeacherTargets


def _lazy(b=3, t=10, h=16, v=97, seed=0) -> TeacherTargets:
    g = torch.Generator().manual_seed(seed)
    return TeacherTargets(hidden=torch.randn(b, t, h, generator=g), lm_head_weight=torch.randn(v, h, generator=g),
                          lm_head_bias=None)


def test_kept_rows_match_every_row_and_the_rest_are_zero():
    out = _lazy()
    b, t = out.shape
    rows = np.zeros((b, t), bool)
    rows[0, 4:] = True   # an answer at the end of block 0
    rows[2, 1:3] = True  # and a short one in block 2; block 1 has no target
    u = tail_uniforms(7, np.arange(b), t, 5)
    every = to_sparse(out, 8, 1.0, None, rows_per_chunk=4, tail_samples=5, uniforms=u)
    kept = to_sparse(out, 8, 1.0, None, rows_per_chunk=4, tail_samples=5, uniforms=u, rows=rows)
    assert [x.shape for x in kept] == [x.shape for x in every]
    m = torch.from_numpy(rows)
    for a, e in zip(kept, every):
        if a.dtype == torch.int64:
            assert torch.equal(a[m], e[m])
        else:
            torch.testing.assert_close(a[m], e[m], rtol=1e-5, atol=1e-6)
        assert not a[~m].any()  # zeros where nothing is kept
    # the draws of a row do not depend on which other rows were computed (uniforms keyed by block and position)
    assert torch.equal(kept[3][m], every[3][m])


def test_no_target_row_in_the_batch_still_gives_the_shapes():
    out = _lazy(b=2, t=6)
    rows = np.zeros((2, 6), bool)
    ids, lp, tail, s_ids, s_lp = to_sparse(out, 4, 1.0, None, tail_samples=3,
                                           uniforms=tail_uniforms(0, np.arange(2), 6, 3), rows=rows)
    assert ids.shape == (2, 6, 4) and s_ids.shape == (2, 6, 3) and tail.shape == (2, 6)
    assert np.isfinite(lp.numpy()).all() and np.isfinite(tail.numpy()).all()


def test_vocab_cut_and_plain_logits_with_rows():
    logits = torch.randn(2, 5, 50)
    rows = np.array([[True, False, True, False, False], [False] * 5])
    every = to_sparse(logits, 6, 2.0, 40)
    kept = to_sparse(logits, 6, 2.0, 40, rows=rows)
    m = torch.from_numpy(rows)
    assert torch.equal(kept[0][m], every[0][m]) and int(kept[0].max()) < 40
    torch.testing.assert_close(kept[1][m], every[1][m])
    assert kept[3] is None and not kept[1][~m].any()
