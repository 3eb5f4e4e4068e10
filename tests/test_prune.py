"""Pruning: exact identity when nothing is removed, consistent shapes/configs, GQA validity, depth by importance."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from distillery.errors import DistilleryError
from distillery.prune import plan_pruning, prune_model
from distillery.prune.importance import layers_removed, loss_importance
from tiny import tiny_llama, tiny_qwen2


def calib(seed: int = 0, B: int = 3, T: int = 24, vocab: int = 512) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, T - 5:] = 0  # one right-padded row: padding must not count
    return [{"input_ids": ids, "attention_mask": mask}]


def logits(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


BUILDERS = {"llama": lambda **kw: tiny_llama(**kw), "llama_tied": lambda **kw: tiny_llama(tie=True, **kw),
            "qwen2": lambda **kw: tiny_qwen2(**kw)}


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_nothing_removed_reproduces_teacher_exactly(family):
    teacher = BUILDERS[family](layers=3)
    cfg = teacher.config
    b = calib()[0]
    student = prune_model(teacher, calib(), layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
                          ffn=cfg.intermediate_size, heads=cfg.num_attention_heads)
    assert student is not teacher
    assert torch.equal(logits(student, b), logits(teacher, b))
    assert student.config.head_dim == teacher.model.layers[0].self_attn.head_dim


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_pruned_shapes_config_and_save_load(family, tmp_path):
    teacher = BUILDERS[family](layers=4, hidden=64, heads=8, kv_heads=4, ffn=128)
    student = prune_model(teacher, calib(), layers=3, hidden=40, ffn=72, heads=4)
    c = student.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (3, 40, 72)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (4, 4, 8)  # head_dim kept: 64 / 8
    assert len(student.model.layers) == 3
    # Every tensor has the shape a fresh model of the pruned config would have.
    fresh = type(teacher)(copy.deepcopy(c))
    assert {k: v.shape for k, v in student.state_dict().items()} == {k: v.shape for k, v in fresh.state_dict().items()}
    if family == "qwen2":
        assert c.layer_types == ["full_attention"] * 3
    student.save_pretrained(tmp_path, safe_serialization=True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(loaded) is type(teacher) and loaded.config.head_dim == 8
    b = calib(seed=1)[0]
    out = logits(loaded, b)
    assert out.shape == (3, 24, 512) and torch.isfinite(out).all()
    assert torch.equal(out, logits(student, b))


def test_tied_embeddings_stay_tied_and_slice_channels(tmp_path):
    teacher = tiny_llama(tie=True, layers=2)
    plan = plan_pruning(teacher, calib(), hidden=48)
    student = prune_model(teacher, calib(), hidden=48)
    c = plan.channels
    assert c.shape == (48,) and torch.equal(c, c.sort().values)
    emb, head = student.model.embed_tokens.weight, student.lm_head.weight
    assert emb.data_ptr() == head.data_ptr()
    assert torch.equal(emb, teacher.model.embed_tokens.weight[:, c])
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight[c])
    assert torch.equal(student.model.layers[1].mlp.down_proj.weight, teacher.model.layers[1].mlp.down_proj.weight[c])
    student.save_pretrained(tmp_path, safe_serialization=True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight, emb)


def _mask_heads(teacher, plan, head_dim):
    """The teacher with the o_proj columns of every dropped query head zeroed (the exact reference)."""
    ref = copy.deepcopy(teacher)
    for layer, kept in zip(ref.model.layers, plan.q_heads):
        w = layer.self_attn.o_proj.weight
        drop = sorted(set(range(w.shape[1] // head_dim)) - set(kept.tolist()))
        for h in drop:
            w.data[:, h * head_dim:(h + 1) * head_dim] = 0
    return ref


@pytest.mark.parametrize("heads,kv_heads,expect_kv", [(4, None, 2), (2, None, 2), (3, None, 1), (4, 1, 1)])
def test_head_pruning_keeps_gqa_valid(heads, kv_heads, expect_kv):
    teacher = tiny_llama(layers=2, hidden=48, heads=8, kv_heads=2)  # groups of 4 query heads, head_dim 6
    plan = plan_pruning(teacher, calib(), heads=heads, kv_heads=kv_heads)
    student = prune_model(teacher, calib(), heads=heads, kv_heads=kv_heads)
    c = student.config
    assert c.num_attention_heads == heads and c.num_key_value_heads == expect_kv
    assert c.num_attention_heads % c.num_key_value_heads == 0 and c.head_dim == 6
    for q, kv in zip(plan.q_heads, plan.kv_heads):
        per = heads // expect_kv
        # new query head j reads new KV head j // per, which must be its teacher group
        assert [int(h) // 4 for h in q] == [int(kv[j // per]) for j in range(heads)]
    b = calib(seed=2)[0]
    torch.testing.assert_close(logits(student, b), logits(_mask_heads(teacher, plan, 6), b), rtol=1e-5, atol=1e-5)


def test_head_target_that_breaks_gqa_is_refused():
    teacher = tiny_llama(layers=1, heads=4, kv_heads=2)  # groups of 2
    with pytest.raises(DistilleryError, match="grouped-query"):
        prune_model(teacher, calib(), heads=3)


def test_neuron_pruning_keeps_the_most_active_and_equals_masking():
    teacher = tiny_llama(layers=2)
    plan = plan_pruning(teacher, calib(), ffn=40)
    ref = copy.deepcopy(teacher)
    acts = []
    hooks = [lyr.mlp.down_proj.register_forward_pre_hook(lambda m, a: acts.append(a[0].abs()))
             for lyr in teacher.model.layers]
    b = calib()[0]
    logits(teacher, b)
    for h in hooks:
        h.remove()
    m = b["attention_mask"].float()[..., None]
    for i, (layer, kept) in enumerate(zip(ref.model.layers, plan.neurons)):
        score = (((acts[i] * m).sum(1) / m.sum(1)) ** 2).sum(0).sqrt()  # (F,) mean over tokens, L2 over rows
        assert kept.tolist() == sorted(torch.topk(score, 40).indices.tolist())
        drop = sorted(set(range(128)) - set(kept.tolist()))
        layer.mlp.down_proj.weight.data[:, drop] = 0
    student = prune_model(teacher, calib(), ffn=40)
    torch.testing.assert_close(logits(student, b), logits(ref, b), rtol=1e-5, atol=1e-5)


def _with_identity_layer(build, layer: int):
    teacher = build(layers=4)
    blk = teacher.model.layers[layer]
    blk.self_attn.o_proj.weight.data.zero_()  # attention adds nothing ...
    blk.mlp.down_proj.weight.data.zero_()     # ... nor does the MLP: the block is the identity
    return teacher


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_depth_block_importance_drops_identity_layer_first(family):
    teacher = _with_identity_layer(BUILDERS[family], 1)
    plan = plan_pruning(teacher, calib(), layers=3)
    assert plan.layers == [0, 2, 3]
    assert plan.scores["depth_scores"][1] == pytest.approx(0.0, abs=1e-6)
    assert min(plan.scores["depth_scores"][i] for i in (0, 2, 3)) > 1e-3
    student = prune_model(teacher, calib(), layers=3)
    b = calib(seed=3)[0]
    torch.testing.assert_close(logits(student, b), logits(teacher, b), rtol=1e-5, atol=1e-5)


def test_depth_loss_method_scores_identity_layer_zero():
    teacher = _with_identity_layer(BUILDERS["llama"], 2)
    batches = calib()
    scores = loss_importance(teacher, batches, span=1)
    assert scores.shape == (4,) and scores[2].item() == pytest.approx(0.0, abs=1e-5)
    # reference: the loss of the teacher with layer 0 removed, computed by hand
    b = batches[0]
    with layers_removed(teacher, {0}):
        lg = logits(teacher, b)
    lg_full = logits(teacher, b)
    ids, mask = b["input_ids"], b["attention_mask"]
    ok = (mask[:, 1:] * mask[:, :-1]).bool()
    ce = lambda x: torch.nn.functional.cross_entropy(x[:, :-1][ok], ids[:, 1:][ok]).item()  # noqa: E731
    assert scores[0].item() == pytest.approx(ce(lg) - ce(lg_full), abs=1e-4)
    plan = plan_pruning(teacher, batches, layers=3, method="loss")
    assert torch.equal(plan.scores["depth_scores"], scores)
    # the dropped layer is the one whose removal costs least
    assert [i for i in range(4) if i not in plan.layers] == [int(scores.argmin())]


def test_contiguous_depth_drops_one_block():
    teacher = _with_identity_layer(BUILDERS["llama"], 1)
    teacher.model.layers[2].self_attn.o_proj.weight.data.zero_()
    teacher.model.layers[2].mlp.down_proj.weight.data.zero_()
    plan = plan_pruning(teacher, calib(), layers=2, contiguous=True)
    assert plan.layers == [0, 3]
    assert plan.scores["depth_scores"].shape == (3,)


def test_qwen2_biases_follow_kept_heads():
    teacher = tiny_qwen2(layers=1, hidden=64, heads=8, kv_heads=2)
    for name in ("q_proj", "k_proj", "v_proj"):
        getattr(teacher.model.layers[0].self_attn, name).bias.data.normal_()
    plan = plan_pruning(teacher, calib(), heads=4, kv_heads=1, hidden=48)
    student = prune_model(teacher, calib(), heads=4, kv_heads=1, hidden=48)
    s, t = student.model.layers[0].self_attn, teacher.model.layers[0].self_attn
    q_rows = (plan.q_heads[0][:, None] * 8 + torch.arange(8)).reshape(-1)
    kv_rows = (plan.kv_heads[0][:, None] * 8 + torch.arange(8)).reshape(-1)
    assert torch.equal(s.q_proj.bias, t.q_proj.bias[q_rows])
    assert torch.equal(s.k_proj.bias, t.k_proj.bias[kv_rows]) and torch.equal(s.v_proj.bias, t.v_proj.bias[kv_rows])
    assert torch.equal(s.q_proj.weight, t.q_proj.weight[q_rows][:, plan.channels])
    assert s.o_proj.bias is None and s.q_proj.bias.shape == (32,) and s.k_proj.bias.shape == (8,)


def test_unsupported_architectures_and_targets_are_refused():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(DistilleryError, match="not supported"):
        prune_model(gpt2, calib(vocab=64), layers=1)
    teacher = tiny_llama(layers=2)
    with pytest.raises(DistilleryError, match="not supported"):
        prune_model(teacher.model, calib())  # a bare LlamaModel has no LM head
    with pytest.raises(DistilleryError, match="hidden=80 exceeds"):
        prune_model(teacher, calib(), hidden=80)
    with pytest.raises(DistilleryError, match="layers must be a positive"):
        prune_model(teacher, calib(), layers=0)
    with pytest.raises(DistilleryError, match="calibration data is empty"):
        prune_model(teacher, [], layers=1)


def test_llama_hidden_must_divide_by_heads_before_any_calibration():
    # transformers' LlamaConfig refuses to save/load hidden_size % num_attention_heads != 0, head_dim or not
    teacher = tiny_llama(layers=1, hidden=64, heads=4, kv_heads=2)
    with pytest.raises(DistilleryError, match=r"rejects the pruned llama config .*multiple"):
        prune_model(teacher, [], hidden=50)


def test_student_init_pruned_goes_through_prune_model():
    from distillery.config import StudentConfig
    from distillery.students import build_student

    teacher = tiny_qwen2(layers=3, hidden=64, heads=4, kv_heads=2, ffn=128)
    cfg = StudentConfig(init="pruned", prune={"layers": 2, "hidden": 32, "ffn": 64, "heads": 2})
    student = build_student(cfg, teacher, calibration=calib())
    c = student.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads, c.head_dim) == (2, 32, 64, 2, 16)
    assert student.training and all(p.requires_grad for p in student.parameters())
    assert teacher.config.num_hidden_layers == 3 and len(teacher.model.layers) == 3
