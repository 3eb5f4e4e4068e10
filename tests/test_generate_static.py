"""The fast sampler: StaticDecoder (preallocated K/V, the model's own submodules) and dropping finished rows.

Greedy tokens must equal transformers' ``generate`` on the same batch (left padding, EOS), on every
architecture the static path claims; the LM head must run on exactly one row per generated token.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import MistralConfig, MistralForCausalLM, Qwen3Config, Qwen3ForCausalLM

from distillery.errors import DistilleryError
from distillery.generate import sample, static_decode_supported
from distillery.packed_linear import PackedLinear
from distillery.static_decode import StaticDecoder
from tiny import tiny_llama, tiny_qwen2
from test_generate import PAD, hf_greedy, left_padded_prompts


def tiny_qwen3():
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=512, eos_token_id=0, pad_token_id=PAD)
    return Qwen3ForCausalLM(cfg).eval()


def tiny_mistral(window):
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, sliding_window=window, max_position_embeddings=512, pad_token_id=PAD)
    return MistralForCausalLM(cfg).eval()


def head_rows(model, monkeypatch):
    """Rows the LM head runs on, per call: a forward hook on ``lm_head`` (the HF decoder) and a wrapper around
    ``StaticDecoder.logits`` (the static decoder runs the head's weight packed, not the module)."""
    rows = []
    model.lm_head.register_forward_hook(lambda m, i, o: rows.append(i[0].reshape(-1, i[0].shape[-1]).shape[0]))
    real = StaticDecoder.logits

    def logits(self, normed):
        rows.append(normed.shape[0])
        return real(self, normed)

    monkeypatch.setattr(StaticDecoder, "logits", logits)
    return rows


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2, tiny_qwen3, lambda: tiny_mistral(None)])
@pytest.mark.parametrize("decoder", ["static", "hf"])
def test_greedy_equals_generate(build, decoder):
    model = build()
    assert static_decode_supported(model, 40)
    ids, mask = left_padded_prompts(lengths=(7, 3, 5, 6))
    seqs, completion = sample(model, ids, mask, max_new_tokens=14, sample_temperature=0.0, eos_token_id=None,
                              pad_token_id=PAD, decoder=decoder)
    assert torch.equal(seqs, hf_greedy(model, ids, mask, 14, None))
    assert completion[:, 7:].sum() == 4 * 14


@pytest.mark.parametrize("decoder", ["static", "hf"])
def test_finished_rows_leave_the_batch_and_tokens_still_equal_generate(decoder, monkeypatch):
    model = tiny_llama(layers=2)
    ids, mask = left_padded_prompts(lengths=(7, 3, 5, 6), seed=1)
    free, _ = sample(model, ids, mask, max_new_tokens=12, sample_temperature=0.0, eos_token_id=None, pad_token_id=PAD)
    row0 = free[0, 7:].tolist()
    eos = row0[next(k for k in range(1, 6) if row0[k] not in row0[:k])]  # row 0 ends early on this token
    rows = head_rows(model, monkeypatch)
    seqs, completion = sample(model, ids, mask, max_new_tokens=12, sample_temperature=0.0, eos_token_id=eos,
                              pad_token_id=PAD, decoder=decoder)
    rows = list(rows)  # ours only (generate below runs the same head)
    ref = hf_greedy(model, ids, mask, 12, eos)
    assert torch.equal(seqs, ref[:, :seqs.shape[1]]) and (ref[:, seqs.shape[1]:] == PAD).all()
    generated = int(completion.sum())
    assert rows[0] == 4 and sum(rows) == generated  # prefill, then one head row per generated token: none wasted
    assert rows == sorted(rows, reverse=True) and min(rows) < 4  # the batch shrank as rows ended


def test_static_and_hf_decoders_draw_the_same_samples():
    model = tiny_qwen2(layers=2)
    ids, mask = left_padded_prompts()
    out = [sample(model, ids, mask, max_new_tokens=10, sample_temperature=1.0, top_p=0.9, pad_token_id=PAD,
                  eos_token_id=[5, 6, 7], generator=torch.Generator().manual_seed(4), decoder=d) for d in ("static", "hf")]
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


def test_under_bf16_autocast_the_decode_layers_stay_fp32_and_the_head_runs_bf16(monkeypatch):
    model = tiny_llama(layers=2)
    ids, mask = left_padded_prompts()
    prefill_o = []
    model.model.layers[0].self_attn.o_proj.register_forward_hook(lambda m, i, o: prefill_o.append(o.dtype))
    seen = []  # (decoder, dtype of the normed hidden state, dtype of the logits) per head call
    real = StaticDecoder.logits

    def logits(self, normed):
        out = real(self, normed)
        seen.append((self, normed.dtype, out.dtype))
        return out

    monkeypatch.setattr(StaticDecoder, "logits", logits)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seqs, _ = sample(model, ids, mask, max_new_tokens=5, sample_temperature=0.0, pad_token_id=PAD, decoder="static")
    assert seqs.shape == (3, 12)
    assert prefill_o == [torch.bfloat16]  # the prefill (the model's forward) under the autocast; decode steps use packed weights
    dec = seen[0][0]
    assert dec.qkv[0].weight.dtype == dec.o[0].weight.dtype == dec.down[0].weight.dtype == torch.float32
    assert [s[1] for s in seen[1:]] == [torch.float32] * 4  # 4 decode steps: the layers ran in fp32
    assert [s[2] for s in seen] == [torch.bfloat16] * 5 and dec.head.weight.dtype == torch.bfloat16


def test_short_sliding_window_falls_back_and_static_is_refused():
    model = tiny_mistral(window=8)
    ids, mask = left_padded_prompts()
    assert not static_decode_supported(model, 7 + 6) and static_decode_supported(tiny_mistral(window=64), 13)
    seqs, _ = sample(model, ids, mask, max_new_tokens=6, sample_temperature=0.0, pad_token_id=PAD)  # auto: HF decoder
    assert torch.equal(seqs, hf_greedy(model, ids, mask, 6, None))
    with pytest.raises(DistilleryError, match="static"):
        sample(model, ids, mask, max_new_tokens=6, decoder="static")
    with pytest.raises(DistilleryError, match="decoder must be"):
        sample(model, ids, mask, max_new_tokens=6, decoder="fast")


@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_f_linear_for_any_row_count(bias):
    torch.manual_seed(0)
    W = torch.randn(300, 48)
    b = torch.randn(300) if bias else None
    lin = PackedLinear(W, b, rows=8)
    for rows in (1, 3, 8, 11):  # packed for 8 rows; fewer (finished rows dropped) or more still work
        x = torch.randn(rows, 48)
        assert torch.allclose(lin(x), F.linear(x, W, b), atol=1e-5, rtol=1e-5)
    half = PackedLinear(W, b, rows=8, dtype=torch.bfloat16)
    x = torch.randn(5, 48)
    ref = F.linear(x.bfloat16(), W.bfloat16(), None if b is None else b.bfloat16())
    assert half(x.bfloat16()).dtype == torch.bfloat16
    assert torch.allclose(half(x.bfloat16()).float(), ref.float(), atol=0.1, rtol=0.02)
    if lin.packed is not None:  # oneDNN present (every x86 / Arm CPU build): the pack is a snapshot of W
        before = lin(x)
        W.mul_(2.0)  # so sample() packs again at every call, after the optimizer has stepped
        assert torch.equal(lin(x), before)


def _sample(model, ids, mask, n=10):
    return sample(model, ids, mask, max_new_tokens=n, sample_temperature=0.0, eos_token_id=None, pad_token_id=PAD,
                  decoder="static", head="screened")[0]


def test_an_eval_model_keeps_its_packs_between_calls_and_repacks_after_its_weights_change():
    import copy

    from distillery.static_decode import PackCache

    model = tiny_llama()
    ids, mask = left_padded_prompts(lengths=(7, 3, 5, 6))
    first = _sample(model, ids, mask)
    packs = model.__dict__["_distillery_packs"]
    assert isinstance(packs, PackCache) and {"qkv0", "o1", "gate_up0", "down1"} <= set(packs)
    kept = {k: v[2] for k, v in packs.items()}
    assert torch.equal(_sample(model, ids, mask), first)
    assert all(packs[k][2] is v for k, v in kept.items())          # second call: nothing repacked
    with torch.no_grad():                                            # an in-place update (as an optimizer step)
        model.model.layers[1].mlp.down_proj.weight.mul_(3.0)
        model.lm_head.weight.add_(0.05 * torch.randn_like(model.lm_head.weight))
    changed = _sample(model, ids, mask)
    assert packs["down1"][2] is not kept["down1"] and packs["qkv0"][2] is kept["qkv0"]
    assert [k for k in packs if k.startswith("screen")] and all(
        packs[k][2] is not kept[k] for k in packs if k.startswith("screen"))
    assert torch.equal(changed, hf_greedy(model, ids, mask, 10, None))  # the new weights' tokens, not stale ones
    assert not torch.equal(changed, first)
    clone = copy.deepcopy(model)                                     # a copy gets an empty cache, not the packs
    assert len(clone.__dict__["_distillery_packs"]) == 0
    assert torch.equal(_sample(clone, ids, mask), changed)


def test_a_training_model_keeps_no_packs():
    model = tiny_llama().train()
    ids, mask = left_padded_prompts(lengths=(7, 3, 5, 6))
    _sample(model, ids, mask)
    assert "_distillery_packs" not in model.__dict__ and model.training
