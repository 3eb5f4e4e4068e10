"""GGUF writer, checked with the gguf package's own reader (no llama.cpp needed)."""

from __future__ import annotations

import sys

import gguf
import jinja2
import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from distillery.errors import DistilleryError
from distillery.export import export_model, write_gguf
from distillery.export.gguf_export import permute_qk
from distillery.export.gguf_vocab import gguf_chat_template, pre_tokenizer_name
from tiny import tiny_llama, tiny_qwen2, tiny_tokenizer

Q = gguf.GGMLQuantizationType


def _read(path):
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: t for t in reader.tensors}
    return meta, tensors


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_llama_f32_tensors_and_metadata(tmp_path, tok):
    model = tiny_llama()
    report = write_gguf(model, tok, tmp_path / "s.gguf", "f32", "llama", name="tiny")
    meta, tensors = _read(report["path"])
    per_block = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"}
    expected |= {f"blk.{i}.{n}.weight" for i in range(2) for n in per_block}
    assert set(tensors) == expected
    # GGUF lists dimensions innermost first: (out, in) in torch is [in, out] here
    assert list(tensors["blk.0.attn_k.weight"].shape) == [64, 32]
    assert list(tensors["token_embd.weight"].shape) == [64, 512]
    assert all(t.tensor_type == Q.F32 for t in tensors.values())
    hf_k = model.model.layers[0].self_attn.k_proj.weight.detach()
    stored = np.asarray(tensors["blk.0.attn_k.weight"].data).reshape(32, 64)
    assert np.array_equal(stored, permute_qk(hf_k, 2).numpy())
    assert np.array_equal(np.asarray(tensors["blk.1.ffn_down.weight"].data).reshape(64, 128),
                          model.model.layers[1].mlp.down_proj.weight.detach().numpy())
    assert meta["general.architecture"] == "llama" and meta["general.name"] == "tiny"
    assert (meta["llama.block_count"], meta["llama.context_length"], meta["llama.embedding_length"]) == (2, 512, 64)
    assert (meta["llama.feed_forward_length"], meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (128, 4, 2)
    assert meta["llama.rope.freq_base"] == 10000.0 and meta["llama.rope.dimension_count"] == 16
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert meta["llama.vocab_size"] == 512 and meta["general.file_type"] == 0
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert len(meta["tokenizer.ggml.tokens"]) == 512 and meta["tokenizer.ggml.tokens"][0] == "<|endoftext|>"
    assert meta["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 3] and meta["tokenizer.ggml.token_type"][300] == 1
    assert len(meta["tokenizer.ggml.merges"]) == 512 - 4 - 256
    assert (meta["tokenizer.ggml.eos_token_id"], meta["tokenizer.ggml.padding_token_id"]) == (0, 3)
    assert meta["tokenizer.ggml.bos_token_id"] == 0 and meta["tokenizer.ggml.add_bos_token"] is False
    assert "{% generation %}" not in meta["tokenizer.chat_template"] and "im_start" in meta["tokenizer.chat_template"]


def test_llama_rope_permutation_maps_rotate_half_to_interleaved_pairs():
    """RoPE on HF rows (rotate-half) == RoPE on permuted rows (adjacent pairs, llama.cpp), row-permuted."""
    torch.manual_seed(0)
    n_head, hd, pos = 3, 8, 5.0
    w, x = torch.randn(n_head * hd, 16), torch.randn(16)
    freqs = pos * 10000.0 ** (-torch.arange(0, hd, 2).float() / hd)               # (hd/2,)
    q = (w @ x).view(n_head, hd)
    a, b = q[:, : hd // 2], q[:, hd // 2:]
    hf = torch.cat([a * freqs.cos() - b * freqs.sin(), b * freqs.cos() + a * freqs.sin()], -1)
    qp = (permute_qk(w, n_head) @ x).view(n_head, hd // 2, 2)
    x0, x1 = qp[..., 0], qp[..., 1]
    gptj = torch.stack([x0 * freqs.cos() - x1 * freqs.sin(), x1 * freqs.cos() + x0 * freqs.sin()], -1)
    assert torch.allclose(gptj.reshape(-1), permute_qk(hf.reshape(-1, 1), n_head).reshape(-1), atol=1e-6)


def test_qwen2_tied_q4_0_types_biases_and_no_permutation(tmp_path, tok):
    model = tiny_qwen2()
    report = write_gguf(model, tok, tmp_path / "q.gguf", "q4_0", "qwen2")
    meta, tensors = _read(report["path"])
    assert meta["general.architecture"] == "qwen2" and meta["general.file_type"] == 2
    assert "output.weight" not in tensors                      # tied: llama.cpp reuses token_embd
    assert tensors["token_embd.weight"].tensor_type == Q.Q8_0   # it computes the logits: kept at 8 bits
    assert tensors["blk.0.attn_q.weight"].tensor_type == Q.Q4_0
    assert tensors["blk.0.attn_q.bias"].tensor_type == Q.F32 and tensors["blk.0.attn_norm.weight"].tensor_type == Q.F32
    q = tensors["blk.0.attn_q.weight"]
    back = gguf.quants.dequantize(np.asarray(q.data), Q.Q4_0).reshape(64, 64)
    w = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    assert np.abs(back - w).max() <= np.abs(w).max() / 7                          # unpermuted, 4-bit close
    assert report["tensor_types"] == {"Q8_0": 1, "Q4_0": 14, "F32": 11}


def test_q8_0_values_round_trip(tmp_path, tok):
    model = tiny_llama(tie=True)
    meta, tensors = _read(write_gguf(model, tok, tmp_path / "t.gguf", "q8_0", "llama")["path"])
    assert meta["general.file_type"] == 7 and "output.weight" not in tensors
    t = tensors["blk.1.ffn_up.weight"]
    assert t.tensor_type == Q.Q8_0
    back = gguf.quants.dequantize(np.asarray(t.data), Q.Q8_0).reshape(128, 64)
    w = model.model.layers[1].mlp.up_proj.weight.detach().numpy()
    assert np.abs(back - w).max() <= np.abs(w).max() / 127


def test_chat_template_renders_like_hf(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}]
    template = gguf_chat_template(tok.chat_template)
    plain = jinja2.Environment().from_string(template).render(messages=messages, add_generation_prompt=True)
    assert plain == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_pre_tokenizer_mapping():
    byte_level = {"type": "ByteLevel", "use_regex": True}
    assert pre_tokenizer_name({"pre_tokenizer": byte_level}) == ("gpt-2", True)
    digits = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    assert pre_tokenizer_name({"pre_tokenizer": digits}) == ("smollm", True)
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}}) == ("gpt-2", False)


@pytest.fixture()
def student_dir(tmp_path, tok):
    path = tmp_path / "student"
    tiny_llama().save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_export_model_without_verification(student_dir, tmp_path):
    report = export_model(student_dir, "gguf", tmp_path / "out" / "s.gguf", "q8_0", verify=False)
    assert report["verification"] is None and report["bytes"] > 0 and report["tensor_types"]["Q8_0"] == 16
    assert not list((tmp_path / "out").glob("*.partial"))


def test_unsupported_architecture_is_refused(tmp_path, tok):
    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=512)).save_pretrained(path)
    tok.save_pretrained(path)
    with pytest.raises(DistilleryError, match="GPT2LMHeadModel is not supported"):
        export_model(path, "gguf", tmp_path / "g.gguf", verify=False)


@pytest.mark.parametrize("fmt,quant,out,match", [
    ("gguf", "q5_k", "x.gguf", "q5_k is not supported"),
    ("tflite", "f16", "x", "tflite is not supported"),
    ("onnx", "q4_0", "x", "not available for ONNX"),
    ("gguf", "f16", ".", "is a folder|would write over the student folder"),
])
def test_bad_arguments(student_dir, tmp_path, fmt, quant, out, match):
    with pytest.raises(DistilleryError, match=match):
        export_model(student_dir, fmt, tmp_path / out, quant, verify=False)


def test_bad_student_paths(tmp_path):
    with pytest.raises(DistilleryError, match="does not exist"):
        export_model(tmp_path / "nope", "gguf", tmp_path / "x.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DistilleryError, match="no config.json"):
        export_model(tmp_path / "empty", "gguf", tmp_path / "x.gguf")


def test_unsupported_rope_scaling_is_refused(tmp_path, tok):
    model = tiny_llama()
    model.config.rope_parameters = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}
    with pytest.raises(DistilleryError, match="llama3"):
        write_gguf(model, tok, tmp_path / "r.gguf", "f16", "llama")


def test_verification_without_llama_cpp_says_how_to_install(student_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)        # import llama_cpp -> ImportError
    with pytest.raises(DistilleryError, match="llama-cpp-python is not installed.*--no-verify"):
        export_model(student_dir, "gguf", tmp_path / "s.gguf", "f16", verify=True)
    assert (tmp_path / "s.gguf").is_file()                    # written, reported as unverified


def test_int4_quantized_student_exports_to_q4_0_without_new_rounding(tmp_path, tok):
    """quantize --bits 4 puts weights on the Q4_0 grid, so GGUF q4_0 export only rounds the scales to fp16."""
    from distillery.quantize import quantize_linears

    model = tiny_llama()
    quantize_linears(model, bits=4, group_size=32)
    _, tensors = _read(write_gguf(model, tok, tmp_path / "q.gguf", "q4_0", "llama")["path"])
    back = gguf.quants.dequantize(np.asarray(tensors["blk.0.ffn_gate.weight"].data), Q.Q4_0).reshape(128, 64)
    w = model.model.layers[0].mlp.gate_proj.weight.detach().numpy()
    assert np.abs(back - w).max() <= np.abs(w).max() * 2 ** -10


def test_q8_0_check_excuses_near_ties_only():
    """decided_top1 skips rows whose top-1 leads its runner-up by <= tie_std row std's; a flip elsewhere counts."""
    from distillery.export.verify import decided_top1, gguf_problems

    ref = np.zeros((100, 8), np.float32)
    ref[:, 0], ref[:, 1] = 3.0, 2.0                     # decided rows: top-1 leads by 1 nat
    ref[:10, 1] = 2.95                                   # 10 near-ties: lead 0.05 nats = 0.036 std
    test = ref.copy()
    test[:10, 1] = 3.02                                  # every near-tie flips
    assert decided_top1(ref, test, 0.05) == (1.0, 90) and decided_top1(ref, test, 0.0) == pytest.approx((0.9, 100))
    test[10, 1] = 3.5                                    # one decided row flips
    assert decided_top1(ref, test, 0.05) == pytest.approx((89 / 90, 90))
    assert decided_top1(ref[:10], test[:10], 0.05) == (0.0, 10)   # no decided row: judged on all rows
    ok = {"top1_agreement": 0.89, "top1_agreement_decided": 0.995, "tokenizer_agreement": 1.0}
    assert gguf_problems(ok, "q8_0") == [] and gguf_problems(ok, "q4_0") == []
    assert gguf_problems(ok, "f16") == ["top-1 agreement 89.00% < 99%"]
    bad = {**ok, "top1_agreement_decided": 0.97}
    assert gguf_problems(bad, "q8_0") == ["top-1 agreement where torch's top-1 leads by > 0.05 std of its logits 97.00% < 99%"]
