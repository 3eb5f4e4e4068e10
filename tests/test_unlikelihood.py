"""Sequence-level unlikelihood on on-policy steps (``loss.unlikelihood_weight``; losses/unlikelihood.py)."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distillery.config import load_config
from distillery.errors import DistilleryError
from distillery.losses.unlikelihood import repeat_mask, split_repeats, unlikelihood_loss
from distillery.train import distill
from helpers_run import make_corpus, make_teacher, write_recipe
from tiny import tiny_llama

ON = ["generation.on_policy_fraction=1.0", "generation.max_new_tokens=16", "generation.prompt_tokens=8",
      "generation.sample_temperature=0", "train.eval_every=0", "train.save_every=0"]


def _marked(labels, n):
    return repeat_mask(torch.tensor(labels), n).nonzero().tolist()


def test_repeat_mask_marks_tokens_that_end_an_earlier_ngram():
    row = [-100, 5, 6, 7, 5, 6, 7, 5, -100]  # targets 5 6 7 5 6 7 5 at positions 1..7
    assert _marked([row], 1) == [[0, 4], [0, 5], [0, 6], [0, 7]]
    assert _marked([row], 2) == [[0, 5], [0, 6], [0, 7]]  # (5,6) (6,7) (7,5) each seen once before
    assert _marked([row], 4) == [[0, 7]]  # (5,6,7,5) again at the end
    assert _marked([row], 8) == []
    # -100 inside a row is skipped (the n-gram runs over the row's targets in order); rows are independent
    assert _marked([[1, 2, -100, 1, 2], [1, 2, 3, 4, 5]], 2) == [[0, 4]]
    with pytest.raises(ValueError):
        repeat_mask(torch.tensor([row]), 0)


def test_split_repeats_partitions_the_targets():
    labels = torch.tensor([[-100, 3, 4, 3, 4, 3, 4, -100], [9, 9, 9, 9, -100, -100, -100, -100]])
    kd, ul = split_repeats(labels, 2)
    assert torch.equal(kd.masked_fill(kd == -100, 0) + ul.masked_fill(ul == -100, 0), labels.masked_fill(labels == -100, 0))
    assert not ((kd != -100) & (ul != -100)).any()
    assert ul.tolist() == [[-100, -100, -100, -100, 4, 3, 4, -100], [-100, -100, 9, 9, -100, -100, -100, -100]]


@pytest.mark.parametrize("chunk_rows", [1, 2, 64])
@pytest.mark.parametrize("vocab_size", [None, 9])
def test_unlikelihood_loss_value_and_gradients_match_the_formula(chunk_rows, vocab_size):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 8, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, generator=g, dtype=torch.float64, requires_grad=True)
    ul_labels = torch.full((2, 5), -100)
    ul_labels[0, 1], ul_labels[0, 4], ul_labels[1, 2] = 3, 8, 0
    got, n = unlikelihood_loss(hidden, weight, ul_labels, bias=bias, chunk_rows=chunk_rows, vocab_size=vocab_size)
    gh, gw, gb = torch.autograd.grad(got, (hidden, weight, bias))
    v = vocab_size or 11
    q = (hidden @ weight[:v].T + bias[:v]).softmax(-1)  # (2, 5, v), the hand formula on materialised logits
    want = sum(-torch.log(1 - q[b, t, y]) for (b, t), y in [((0, 1), 3), ((0, 4), 8), ((1, 2), 0)])
    rh, rw, rb = torch.autograd.grad(want, (hidden, weight, bias))
    assert n == 3
    assert abs(got.item() - want.item()) < 1e-10
    for a, b in [(gh, rh), (gw, rw), (gb, rb)]:
        assert torch.allclose(a, b, atol=1e-10)
    if vocab_size:  # padded rows of the head get no gradient
        assert gw[vocab_size:].abs().max() == 0


def test_unlikelihood_loss_without_repeats_is_zero_and_differentiable():
    hidden = torch.randn(1, 3, 4, requires_grad=True)
    loss, n = unlikelihood_loss(hidden, torch.randn(6, 4), torch.full((1, 3), -100))
    loss.backward()
    assert n == 0 and loss.item() == 0.0 and hidden.grad.abs().max() == 0


def test_a_certain_repeat_keeps_an_exact_value_and_a_bounded_gradient():
    hidden = torch.ones(1, 1, 2, requires_grad=True)
    weight = torch.zeros(4, 2)
    weight[1, 0] = 1e4  # logits (0, 1e4, 0, 0): q(1) = 1 in fp32, so 1 − q rounds to 0
    weight.requires_grad_(True)
    loss, _ = unlikelihood_loss(hidden, weight, torch.tensor([[1]]))
    loss.backward()
    assert abs(loss.item() - (1e4 - math.log(3))) < 1e-2  # logsumexp(z) − logsumexp(z without y)
    dz = weight.grad[:, 0]  # = q − q' (q' the softmax without y): (−1/3, 1, −1/3, −1/3)
    assert torch.allclose(dz, torch.tensor([-1 / 3, 1.0, -1 / 3, -1 / 3]), atol=1e-5)


def test_unlikelihood_without_on_policy_steps_is_one_clear_line(tmp_path):
    with pytest.raises(DistilleryError) as err:
        load_config(write_recipe(tmp_path, tmp_path / "r"), ["loss.unlikelihood_weight=1"])
    assert "generation.on_policy_fraction" in str(err.value) and "\n" not in str(err.value)


def _greedy_repeat_share(student_dir, prompts: torch.Tensor, n: int = 2) -> float:
    m = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = m.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=24, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    gen = out[:, prompts.shape[1]:]
    return repeat_mask(gen, n).float().mean().item()


def test_unlikelihood_steps_log_their_term_and_train_the_loops_away(tmp_path):
    """The same greedy on-policy KD run with and without the term, from a student whose head is scaled up so that
    its greedy continuations are confident (a fresh tiny model's are near-uniform, so -log(1 - q) is ~0 there).
    KD towards the tiny random teacher makes it loop more; with the term, its greedy continuations of text
    openings repeat far fewer bigrams. The records carry the term."""
    student = tiny_llama(vocab_size=512, hidden=32, layers=1, heads=2, kv_heads=1, ffn=64, seed=3)
    with torch.no_grad():
        student.lm_head.weight.mul_(20.0)
    student.save_pretrained(tmp_path / "looping")
    common = ON + ["loss.unlikelihood_ngram=2", "train.max_steps=12", "train.lr=1e-2", "train.seed=0",
                   "student.init=pretrained", f"student.pretrained={tmp_path / 'looping'}"]
    shares, recs = {}, {}
    tokenizer = AutoTokenizer.from_pretrained(make_teacher(tmp_path))
    text = tokenizer(make_corpus(tmp_path).read_text()[:20_000])["input_ids"]
    prompts = torch.tensor([text[i * 200:i * 200 + 8] for i in range(12)])  # openings like the training prompts
    for weight in (0.0, 4.0):
        out = tmp_path / f"w{weight}"
        cfg = load_config(write_recipe(tmp_path, out), common + [f"loss.unlikelihood_weight={weight}"])
        distill(cfg)
        recs[weight] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"kd"' in x]
        shares[weight] = _greedy_repeat_share(out / "student", prompts)
    assert all("unlikelihood" not in r for r in recs[0.0])
    assert all(math.isfinite(r["unlikelihood"]) and 0 <= r["repeat_share"] <= 1 for r in recs[4.0])
    assert sum(r["repeat_share"] for r in recs[4.0]) > 0  # the greedy samples did repeat bigrams
    assert shares[4.0] < 0.75 * shares[0.0], shares  # measured: 0.48 vs 0.81 (0.25 before training)
