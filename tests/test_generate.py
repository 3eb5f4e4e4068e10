"""Batched KV-cached sampling: greedy == transformers' greedy generate, EOS-aware masks, nucleus sampling."""

from __future__ import annotations

import pytest
import torch

from distillery.errors import DistilleryError
from distillery.generate import completion_mask_from, next_tokens, sample
from tiny import tiny_llama, tiny_qwen2

PAD = 3


def left_padded_prompts(lengths=(7, 3, 5), vocab=512, seed=0):
    """Prompts of different lengths, left-padded: ids (B, P), mask (B, P)."""
    g = torch.Generator().manual_seed(seed)
    P = max(lengths)
    ids = torch.full((len(lengths), P), PAD)
    mask = torch.zeros(len(lengths), P, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, P - n:] = torch.randint(4, vocab, (n,), generator=g)
        mask[b, P - n:] = 1
    return ids, mask


def hf_greedy(model, ids, mask, n, eos):
    model.generation_config.eos_token_id = eos  # also clears the model's default EOS when eos is None
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                          pad_token_id=PAD, eos_token_id=eos)


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2])
def test_greedy_matches_transformers_generate_with_left_padding(build):
    model = build(layers=2)
    ids, mask = left_padded_prompts()
    seqs, completion = sample(model, ids, mask, max_new_tokens=12, sample_temperature=0.0,
                              eos_token_id=None, pad_token_id=PAD)
    ref = hf_greedy(model, ids, mask, 12, None)
    assert seqs.shape == (3, 7 + 12)
    assert torch.equal(seqs, ref)
    assert torch.equal(completion[:, :7], torch.zeros(3, 7, dtype=torch.long))
    assert torch.equal(completion[:, 7:], torch.ones(3, 12, dtype=torch.long))
    again, _ = sample(model, ids, mask, max_new_tokens=12, sample_temperature=0.0, eos_token_id=None, pad_token_id=PAD)
    assert torch.equal(again, seqs)  # deterministic


def test_eos_mask_and_padding_match_generate():
    model = tiny_llama(layers=2)
    ids, mask = left_padded_prompts(seed=1)
    free, _ = sample(model, ids, mask, max_new_tokens=10, sample_temperature=0.0, eos_token_id=None, pad_token_id=PAD)
    row0 = free[0, 7:].tolist()
    k = next(k for k in range(2, 8) if row0[k] not in row0[:k])  # a token row 0 first emits at step k ...
    eos = row0[k]  # ... becomes the EOS
    seqs, completion = sample(model, ids, mask, max_new_tokens=10, sample_temperature=0.0, eos_token_id=eos,
                              pad_token_id=PAD)
    ref = hf_greedy(model, ids, mask, 10, eos)
    assert torch.equal(seqs, ref[:, :seqs.shape[1]])
    assert (ref[:, seqs.shape[1]:] == PAD).all()  # generate may run longer only by padding finished rows
    for b in range(3):
        gen = seqs[b, 7:].tolist()
        stop = gen.index(eos) + 1 if eos in gen else len(gen)
        expected = [0] * 7 + [1] * stop + [0] * (len(gen) - stop)
        assert completion[b].tolist() == expected
        assert all(t == PAD for t in gen[stop:])
    assert completion[0, 7:].tolist()[:k + 2] == [1] * (k + 1) + [0]


def test_stops_early_when_every_row_has_ended():
    model = tiny_qwen2(layers=1)
    ids, mask = left_padded_prompts()
    seqs, completion = sample(model, ids, mask, max_new_tokens=20, sample_temperature=1.0,
                              eos_token_id=list(range(512)), pad_token_id=PAD, generator=torch.Generator().manual_seed(0))
    assert seqs.shape == (3, 8)  # every token is an EOS: one step, then stop
    assert completion[:, -1].tolist() == [1, 1, 1] and completion[:, :-1].sum() == 0


def test_sampling_is_reproducible_and_tiny_top_p_is_greedy():
    model = tiny_llama(layers=1)
    model.train()
    ids, mask = left_padded_prompts()
    a, _ = sample(model, ids, mask, max_new_tokens=8, sample_temperature=1.0, top_p=1.0, pad_token_id=PAD,
                  generator=torch.Generator().manual_seed(5))
    b, _ = sample(model, ids, mask, max_new_tokens=8, sample_temperature=1.0, top_p=1.0, pad_token_id=PAD,
                  generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert model.training  # mode restored
    nucleus, _ = sample(model, ids, mask, max_new_tokens=8, sample_temperature=0.7, top_p=1e-6, pad_token_id=PAD,
                        generator=torch.Generator().manual_seed(5))
    greedy, _ = sample(model, ids, mask, max_new_tokens=8, sample_temperature=0.0, pad_token_id=PAD)
    assert torch.equal(nucleus, greedy)


def test_next_tokens_nucleus_keeps_the_smallest_set_reaching_top_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(4000, 4)
    drawn = next_tokens(logits, 1.0, 0.7, torch.Generator().manual_seed(0))
    counts = torch.bincount(drawn, minlength=4).float() / 4000
    assert counts[0] == 0 and counts[2] == 0  # outside {1, 3}, whose mass 0.8 first reaches 0.7
    assert counts[1] == pytest.approx(0.5 / 0.8, abs=0.03) and counts[3] == pytest.approx(0.3 / 0.8, abs=0.03)
    assert next_tokens(logits[:2], 0.0, 0.7).tolist() == [1, 1]


def test_completion_mask_from():
    gen = torch.tensor([[5, 9, 7, 9, 5], [5, 5, 5, 5, 5], [9, 1, 2, 3, 4]])
    assert completion_mask_from(gen, torch.tensor([9])).tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_right_padded_prompts_are_refused():
    model = tiny_llama(layers=1)
    ids = torch.tensor([[5, 6, PAD]])
    with pytest.raises(DistilleryError, match="left-padded"):
        sample(model, ids, torch.tensor([[1, 1, 0]]), max_new_tokens=2)


def test_next_tokens_two_level_draw_matches_softmax_across_blocks():
    torch.manual_seed(0)
    V, N = 700, 20000  # three blocks of 256, the last one zero-padded
    logits = torch.randn(V) * 1.5
    for T in (0.7, 1.0):
        p = torch.softmax(logits / T, dim=-1).double()
        drawn = next_tokens(logits.expand(N, V), T, 1.0, torch.Generator().manual_seed(1))
        freq = torch.bincount(drawn, minlength=V).double() / N
        assert 0.5 * (freq - p).abs().sum() < 0.06  # sampling noise at N = 20,000 over ~500 live tokens: ~0.04
        mass = [float(freq[a:b].sum()) for a, b in ((0, 256), (256, 512), (512, V))]
        assert mass == pytest.approx([float(p[a:b].sum()) for a, b in ((0, 256), (256, 512), (512, V))], abs=0.015)
    # All the mass on block edges: the draw lands exactly there, never on padding or a zero-probability neighbour.
    for tok in (0, 255, 256, 511, 512, V - 1):
        one = torch.full((4, V), -1e4)
        one[:, tok] = 0.0
        assert next_tokens(one, 1.0, 1.0, torch.Generator().manual_seed(tok)).tolist() == [tok] * 4
