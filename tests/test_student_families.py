"""Student families beyond Llama/Qwen2 (Mistral, Qwen3, Gemma 1/2/3, Phi-3): built from a recipe, one distill
step from the tiny Llama teacher, saved and loaded back with plain transformers, written as GGUF; pruned;
refused in one line where the fused loss or an exporter cannot follow (before anything loads).

llama.cpp parity per family: ``-m llamacpp``; ONNX Runtime parity per family: ``-m slow`` (~50 s each here).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import distillery
from distillery.config import STUDENT_FAMILIES, load_config
from distillery.errors import DistilleryError
from distillery.students import SUPPORTED_FAMILIES, student_config
from helpers_run import make_teacher, write_recipe
from tiny import tiny_tokenizer

NEW = ("mistral", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")
CLASS = {"mistral": "MistralForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM",
         "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM"}
SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=512, pad_token_id=3, eos_token_id=0,
             bos_token_id=None)


def tiny_family(mt: str, seed: int = 0, **extra):
    """A tiny random model of family ``mt`` with weights large enough that mistakes show in the logits."""
    torch.manual_seed(seed)
    fields = {**SMALL, **extra}
    if mt in ("gemma2", "gemma3_text"):
        fields.setdefault("query_pre_attn_scalar", 16)
        fields.setdefault("final_logit_softcapping", None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(mt, **fields)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.ndim > 1 else p.uniform_(0.5, 1.5)
    return model


def test_one_family_list():
    assert SUPPORTED_FAMILIES == STUDENT_FAMILIES
    assert set(NEW) | {"llama", "qwen2"} == set(STUDENT_FAMILIES)
    from distillery.export.gguf_families import FAMILIES
    from distillery.export.inputs import SUPPORTED_ARCHS
    from distillery.prune import SUPPORTED

    assert set(SUPPORTED_ARCHS.values()) == set(FAMILIES) == set(SUPPORTED) == set(STUDENT_FAMILIES)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 2-step distill per new family (student built from student.model under the tiny Llama teacher)."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for mt in NEW:
        model = {"model_type": mt, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                 "num_attention_heads": 2, "num_key_value_heads": 1}
        recipe = write_recipe(root, root / mt, student={"model": model},
                              train={"max_steps": 2, "eval_every": 0, "save_every": 2, "log_every": 1})
        out[mt] = (distillery.distill(recipe), root)
    return out


@pytest.mark.parametrize("mt", NEW)
def test_family_distills_saves_and_loads(runs, mt):
    result, root = runs[mt]
    rows = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    # a random 32-wide student under a 512-token vocabulary starts near log(512) = 6.24 nats of KL+entropy
    assert all(0 < r["kd"] < 20 and torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    folder = result.output_dir / "student"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert type(model).__name__ == CLASS[mt]
    assert model.config.hidden_size == 32 and model.config.vocab_size == 512
    assert model.config.head_dim == 16
    if mt in ("gemma2", "gemma3_text"):  # the student keeps Gemma's attention scale relation and no soft-cap
        assert model.config.query_pre_attn_scalar == 16 and model.config.final_logit_softcapping is None
    if mt.startswith("gemma"):  # a Gemma student keeps Gemma's GELU under a SiLU Llama teacher
        act = getattr(model.config, "hidden_activation", None) or model.config.hidden_act
        assert act == "gelu_pytorch_tanh"
    ids = torch.tensor([[5, 17, 40, 99, 7]])
    assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("mt", NEW)
def test_family_writes_gguf(runs, mt, tmp_path):
    """The saved student becomes a GGUF of the right llama.cpp arch with every tensor named (no verify: llama.cpp
    parity is the llamacpp-marked test below)."""
    import gguf

    from distillery.export.api import export_model

    result, _ = runs[mt]
    report = export_model(result.output_dir / "student", "gguf", tmp_path / "s.gguf", quant="f32", verify=False)
    reader = gguf.GGUFReader(str(tmp_path / "s.gguf"))
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    assert arch == {"mistral": "llama", "gemma3_text": "gemma3"}.get(mt, mt)
    names = {t.name for t in reader.tensors}
    assert "token_embd.weight" in names and "blk.1.ffn_down.weight" in names
    assert report["arch"] == mt
    if mt == "phi3":
        assert "blk.0.attn_qkv.weight" in names
    if mt.startswith("gemma"):  # norms written as 1 + w
        model = AutoModelForCausalLM.from_pretrained(result.output_dir / "student", dtype=torch.float32)
        t = next(t for t in reader.tensors if t.name == "output_norm.weight")
        assert torch.allclose(torch.tensor(t.data.copy()).reshape(-1), model.model.norm.weight.detach() + 1, atol=1e-6)


@pytest.mark.parametrize("mt", NEW)
def test_prune_family(mt):
    """Keeping everything reproduces the teacher's logits exactly; a width/depth cut gives a smaller model of
    the same class whose weights are slices of the teacher's."""
    from distillery.prune import prune_model

    teacher = tiny_family(mt)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 512, (4, 24), generator=gen)
    calib = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]
    same = prune_model(teacher, calib)
    with torch.no_grad():
        assert torch.allclose(same(ids).logits, teacher(ids).logits, atol=1e-5)
    cut = prune_model(teacher, calib, layers=1, hidden=48, ffn=64, heads=2)
    assert type(cut) is type(teacher)
    c = cut.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads) == (1, 48, 64, 2)
    assert c.num_key_value_heads in (1, 2) and c.head_dim == 16  # whole KV groups (kv_group_count)
    with torch.no_grad():
        assert torch.isfinite(cut(ids).logits).all()
    if mt == "phi3":  # fused rows: [q | k | v] and [gate | up] each sliced with its own offset
        qkv = cut.model.layers[0].self_attn.qkv_proj.weight
        assert qkv.shape == ((2 + 2 * c.num_key_value_heads) * 16, 48)
        assert cut.model.layers[0].mlp.gate_up_proj.weight.shape == (128, 48)


def test_softcapped_student_refused_in_one_line(tmp_path):
    recipe = write_recipe(tmp_path, tmp_path / "run", student={"model": {
        "model_type": "gemma2", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "final_logit_softcapping": 30.0}})
    with pytest.raises(DistilleryError, match=r"final_logit_softcapping.*null") as exc:
        load_config(recipe)
    assert "\n" not in str(exc.value)
    # a pretrained Gemma 2 with the soft-cap: refused from its config.json, before the teacher loads
    folder = tmp_path / "gemma2"
    tiny_family("gemma2", final_logit_softcapping=30.0).save_pretrained(folder)
    tiny_tokenizer(512).save_pretrained(folder)
    recipe = write_recipe(tmp_path, tmp_path / "run2", student={"init": "pretrained", "pretrained": str(folder), "model": {}})
    shutil.rmtree(make_teacher(tmp_path))  # no teacher at all: the family check must come before it loads
    with pytest.raises(DistilleryError, match=r"gemma2 with final_logit_softcapping=30.0 is not supported as a student"):
        distillery.distill(recipe)


def test_unknown_family_refused_at_config(tmp_path):
    recipe = write_recipe(tmp_path, tmp_path / "run", student={"model": {"model_type": "gpt2"}})
    with pytest.raises(DistilleryError, match=r"model_type 'gpt2' is not supported \(choose one of llama, mistral"):
        load_config(recipe)


def test_cross_family_student_takes_only_vocabulary_from_teacher():
    teacher = AutoConfig.for_model("llama", **SMALL, rms_norm_eps=1e-5, hidden_act="silu")
    cfg = student_config({"model_type": "gemma", "hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1}, teacher)
    assert cfg.vocab_size == 512 and cfg.pad_token_id == 3 and cfg.head_dim == 16
    assert cfg.hidden_act == "gelu_pytorch_tanh" and cfg.rms_norm_eps == 1e-6  # Gemma's own defaults
    same = student_config({"hidden_size": 32, "num_attention_heads": 2}, teacher)
    assert same.model_type == "llama" and same.rms_norm_eps == 1e-5


def test_exporters_refuse_a_family_they_do_not_write(runs, tmp_path):
    from distillery.export.api import export_model

    result, _ = runs["qwen3"]
    with pytest.raises(DistilleryError, match=r"the executorch exporter does not write model_type 'qwen3'"):
        export_model(result.output_dir / "student", "executorch", tmp_path / "et", quant="f32")
    assert not (tmp_path / "et").exists()


@pytest.mark.llamacpp
@pytest.mark.parametrize("mt", NEW + ("llama", "qwen2"))
def test_gguf_family_matches_llamacpp(mt, tmp_path):
    """f32 GGUF logits in llama.cpp equal transformers' to llama.cpp's f16 KV cache: relative error < 1e-2 (seen 1-2e-3; the
    wrong permutation, norm offset or attention scale gives 0.3 - 1.5), top-1 >= 99 % (near-ties may flip)."""
    from distillery.export.gguf_export import write_gguf
    from distillery.export.metrics import compare_logits
    from distillery.export.verify import llamacpp_logits, torch_logits

    pytest.importorskip("llama_cpp")
    model, tok = tiny_family(mt), tiny_tokenizer(512)
    write_gguf(model, tok, tmp_path / "m.gguf", quant="f32")
    ids = list(range(4, 200))
    r = compare_logits(torch_logits(model, ids, 128), llamacpp_logits(str(tmp_path / "m.gguf"), ids, 128))
    assert r["rel_error"] < 1e-2 and r["top1_agreement"] >= 0.99 and r["kl_ref_test"] < 1e-4, r


@pytest.mark.slow
@pytest.mark.parametrize("mt", NEW)
def test_onnx_family_matches_torch(mt, tmp_path):
    from distillery.export.onnx_export import write_onnx
    from distillery.export.verify import verify_onnx

    model = tiny_family(mt)
    write_onnx(model, tiny_tokenizer(512), tmp_path / "onnx")
    r = verify_onnx(str(tmp_path / "onnx" / "model.onnx"), model, list(range(4, 132)), 64)
    assert r["passed"] and r["max_abs_diff"] < 1e-4 and r["kv_cache_max_abs_diff"] < 1e-4
