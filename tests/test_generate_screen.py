"""The bf16-screened LM head (``screened_head``): the fp32 head's greedy tokens, exact sampling, certified fallback.

Forced with ``head="screened"`` (it runs on any CPU, slowly where bf16 is emulated); ``auto`` turns it on only
where the bf16 probe says bf16 is fast.
"""

from __future__ import annotations

import pytest
import torch

import distillery.generate as generate
from distillery.errors import DistilleryError
from distillery.generate import next_tokens, sample
from distillery.screened_head import ScreenedHead
from distillery.static_decode import StaticDecoder
from test_generate import PAD, hf_greedy, left_padded_prompts
from tiny import tiny_llama, tiny_qwen2


def decoders_seen(monkeypatch) -> list:
    """Every StaticDecoder ``sample`` builds while the test runs."""
    seen, real = [], StaticDecoder.__init__

    def init(self, *a, **k):
        real(self, *a, **k)
        seen.append(self)

    monkeypatch.setattr(StaticDecoder, "__init__", init)
    return seen


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2])
def test_screened_greedy_equals_generate_in_fp32(build, monkeypatch):
    model = build(layers=2)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # logits of a few units, like a trained head: near ties are rare but do occur
    seen = decoders_seen(monkeypatch)
    ids, mask = left_padded_prompts(lengths=(7, 3, 5, 6))
    seqs, _ = sample(model, ids, mask, max_new_tokens=16, sample_temperature=0.0, eos_token_id=None, pad_token_id=PAD,
                     head="screened")
    assert torch.equal(seqs, hf_greedy(model, ids, mask, 16, None))  # generate in fp32: the reference dtype
    screen = seen[0].screen
    assert screen is not None and screen.rows_screened + screen.rows_fallback == 4 * 16
    assert screen.rows_screened >= 4 * 16 - 4  # the certificate decides nearly every row


def test_screen_matches_fp32_argmax_with_bias_ties_and_forced_fallback():
    torch.manual_seed(0)
    V, H = 300, 48
    W, b = torch.randn(V, H), torch.randn(V)
    x = torch.randn(6, H)
    ref = (x @ W.T + b).argmax(dim=-1)
    head = ScreenedHead(W, b, rows=6, k=8)
    assert torch.equal(head.choose(x, 0.0, None), ref) and head.rows_screened == 6 and head.rows_fallback == 0
    # Exact ties: token ref[0]'s row copied to a lower id; the fp32 argmax takes the lower id, so must we.
    j = int(ref[0])
    W2, b2 = W.clone(), b.clone()
    W2[0], b2[0] = W[j], b[j]
    ref2 = (x @ W2.T + b2).argmax(dim=-1)
    assert int(ref2[0]) == 0
    assert torch.equal(ScreenedHead(W2, b2, rows=6, k=8).choose(x, 0.0, None), ref2)
    # k = 1 with that tie: the best left out equals the best kept, so the certificate must fail and fall back.
    tight = ScreenedHead(W2, b2, rows=6, k=1)
    assert torch.equal(tight.choose(x, 0.0, None), ref2) and tight.rows_fallback >= 1


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_screened_sampling_draws_from_softmax_at_the_temperature(temperature):
    torch.manual_seed(1)
    V, H, N = 40, 32, 20000
    W = torch.randn(V, H)
    x = torch.randn(1, H) * 0.4
    p = torch.softmax((x @ W.T)[0] / temperature, dim=-1)       # (V,) the exact distribution
    head = ScreenedHead(W, None, rows=N, k=8)
    draws = head.choose(x.expand(N, H).contiguous(), temperature, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=V).double() / N
    plain = next_tokens((x @ W.T).expand(N, V), temperature, 1.0, torch.Generator().manual_seed(0))
    freq_plain = torch.bincount(plain, minlength=V).double() / N
    tv = 0.5 * (freq - p.double()).abs().sum()
    other = torch.softmax((x @ W.T)[0] * temperature, dim=-1)  # at the other temperature (1 / temperature)
    assert tv < 0.02 and 0.5 * (freq_plain - p.double()).abs().sum() < 0.02  # sampling noise at N = 20,000: ~0.01
    assert 0.5 * (freq - other.double()).abs().sum() > 0.15  # and the temperature matters at this spread
    assert head.rows_screened + head.rows_fallback == N


def test_screened_sampling_is_reproducible_and_static_and_plain_agree_on_greedy(monkeypatch):
    model = tiny_llama(layers=2)
    ids, mask = left_padded_prompts()
    run = lambda seed: sample(model, ids, mask, max_new_tokens=8, sample_temperature=1.0, pad_token_id=PAD,
                              head="screened", generator=torch.Generator().manual_seed(seed))[0]
    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = [sample(model, ids, mask, max_new_tokens=8, sample_temperature=0.0, pad_token_id=PAD, head=h)[0]
              for h in ("screened", "plain")]
    assert torch.equal(greedy[0], greedy[1])


def test_auto_screens_only_where_bf16_is_fast_the_head_is_big_and_not_for_top_p(monkeypatch):
    model = tiny_llama(layers=2)
    ids, mask = left_padded_prompts()
    seen = decoders_seen(monkeypatch)
    run = lambda **k: sample(model, ids, mask, max_new_tokens=3, sample_temperature=1.0, pad_token_id=PAD, **k)
    monkeypatch.setattr(generate, "SCREEN_MIN_HEAD", model.lm_head.weight.numel())  # this head is just big enough
    for fast in (True, False):
        monkeypatch.setattr(generate, "cpu_bf16_fast", lambda fast=fast: fast)
        run()
    assert seen[0].screen is not None and seen[1].screen is None
    monkeypatch.setattr(generate, "cpu_bf16_fast", lambda: True)
    monkeypatch.setattr(generate, "SCREEN_MIN_HEAD", model.lm_head.weight.numel() + 1)  # a head too small to pay
    run()
    assert seen[2].screen is None
    model.__dict__.pop("_distillery_packs", None)  # a fresh screen (an eval model reuses it between calls)
    run(top_p=0.9, head="screened")
    assert seen[3].screen.rows_screened == 0 and seen[3].head is not None  # nucleus sampling: the full fp32 head
    with pytest.raises(DistilleryError, match="head must be"):
        run(head="bf16")


def test_screen_reuses_its_buffers_as_rows_shrink_and_draws_the_gumbel_argmax_exactly():
    torch.manual_seed(2)
    V, H, T = 500, 32, 0.7
    W = torch.randn(V, H)
    head = ScreenedHead(W, None, rows=8, k=8)
    for b in (8, 5, 8, 1):  # rows finish (5, 1) and a later call needs the full batch again
        x = torch.randn(b, H)
        u = torch.rand(b, V, generator=torch.Generator().manual_seed(b))
        ref = ((x @ W.T) / T - (-u.log()).log()).argmax(dim=-1)  # Gumbel-max on torch.rand's draws
        assert torch.equal(head.choose(x, T, torch.Generator().manual_seed(b)), ref)
        assert torch.equal(head.choose(x, 0.0, None), (x @ W.T).argmax(dim=-1))
    assert head._buf.shape == (2, 8, V)  # allocated once, at the largest batch


@pytest.mark.parametrize("V", [49152, 1000, 256])  # 128 | V; 128 does not divide V (plain topk); fewer blocks than k
def test_block_topk_gives_topks_values_and_their_columns(V):
    from distillery.screened_head import block_topk

    torch.manual_seed(V)
    u = torch.randn(8, V)
    u[3, :] = 1.0                     # a row of ties
    u[5, 7] = u[5, 900 % V] = 50.0    # a tie at the top
    top, idx = block_topk(u, 17)
    ref = u.topk(17, dim=-1)
    assert torch.equal(top, ref.values) and torch.equal(u.gather(1, idx), top)
    assert all(len(set(r.tolist())) == 17 for r in idx)  # 17 distinct columns per row
