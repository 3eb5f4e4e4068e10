"""students.sparse_tied_embedding_grad: a tied table's lookup gradient goes in sparse, and the parameter's
gradient is the same dense tensor as before (one (V, H) fewer at the end of backward)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distillery.students import sparse_tied_embedding_grad


def _model(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).double()


def _grads(model, use_head: bool = True) -> dict:
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=ids, labels=ids) if use_head else None
    loss = out.loss if use_head else model.model(input_ids=ids).last_hidden_state.pow(2).mean()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_tied_table_gets_the_same_dense_gradient():
    ref = _grads(_model(True))
    model = _model(True)
    assert sparse_tied_embedding_grad(model) is True
    got = _grads(model)
    assert model.get_input_embeddings().sparse
    assert ref.keys() == got.keys()
    for name in ref:
        assert not got[name].is_sparse, name
        torch.testing.assert_close(got[name], ref[name], atol=1e-12, rtol=1e-10)


def test_untied_table_stays_dense():
    model = _model(False)
    assert sparse_tied_embedding_grad(model) is False
    assert not model.get_input_embeddings().sparse


def test_a_loss_without_the_head_still_leaves_a_dense_grad():
    """Only the lookup's (sparse) gradient reaches the table: the hook makes ``.grad`` dense for the optimizer."""
    ref = _grads(_model(True), use_head=False)
    model = _model(True)
    sparse_tied_embedding_grad(model)
    got = _grads(model, use_head=False)
    name = "model.embed_tokens.weight"
    assert not got[name].is_sparse
    torch.testing.assert_close(got[name], ref[name], atol=1e-12, rtol=1e-10)
    torch.optim.AdamW(model.parameters(), fused=False).step()  # a dense .grad the optimizer takes


def test_a_frozen_table_is_left_alone():
    """A table that does not train (frozen by the user) has no gradient to shrink; before, registering the
    hook raised "cannot register a hook on a tensor that doesn't require gradient" at the start of the run."""
    model = _model(True)
    model.get_input_embeddings().weight.requires_grad_(False)
    assert sparse_tied_embedding_grad(model) is False
    assert not model.get_input_embeddings().sparse
    assert "model.embed_tokens.weight" not in _grads(model)
