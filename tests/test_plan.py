"""`distillery plan`: configs without weights, the memory terms, the fit verdict, the GGUF header reader."""

from __future__ import annotations

import json

import pytest

from distillery.cli import main
from distillery.config import load_config
from distillery.plan import GB, estimate
from distillery.plan_models import count_params, gguf_config, model_shapes, read_gguf_header
from helpers_run import write_recipe


def test_shapes_match_the_built_models(tmp_path):
    from distillery.run_setup import prepare_run
    import torch

    cfg = load_config(write_recipe(tmp_path, tmp_path / "run"))
    teacher, student, cache = model_shapes(cfg)
    run = prepare_run(cfg, torch.device("cpu"))
    assert student.params == sum(p.numel() for p in run.student.parameters())
    assert teacher.params == sum(p.numel() for p in run.teacher.model.parameters()) and cache is None
    assert student.vocab == 512 and student.layers == 1 and student.hidden == 32


def test_memory_terms_follow_the_recipe(tmp_path):
    recipe = write_recipe(tmp_path, tmp_path / "run")
    base = estimate(load_config(recipe), tflops=1.0)
    n = base.student["params"]
    assert base.memory["student weights (fp32)"] == base.memory["gradients"] == 4 * n
    assert base.memory["AdamW moments"] == 8 * n
    bigger = estimate(load_config(recipe, ["train.micro_batch_size=16"]), tflops=1.0)
    act = lambda p: next(v for k, v in p.memory.items() if k.startswith("activations"))  # noqa: E731
    assert act(bigger) == pytest.approx(4 * act(base))  # 16 vs 4 blocks
    two = estimate(load_config(recipe), processes=2, tflops=1.0)
    assert two.memory["DDP gradient buckets"] == 4 * n and two.needed_bytes == pytest.approx(2 * two.peak_bytes)
    assert bigger.flops_per_step == pytest.approx(4 * base.flops_per_step)
    assert base.seconds_per_step == pytest.approx(base.flops_per_step / (1e12 * 0.6))


def test_fsdp_divides_the_student_state_over_processes(tmp_path):
    recipe = write_recipe(tmp_path, tmp_path / "run", student={"model": {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 2,
        "num_key_value_heads": 1, "tie_word_embeddings": True}})
    cfg = load_config(recipe)
    ddp, fsdp = estimate(cfg, processes=4, tflops=1.0), estimate(cfg, processes=4, tflops=1.0, fsdp=True)
    n, v, h = ddp.student["params"], ddp.student["vocab"], ddp.student["hidden"]
    assert "DDP gradient buckets" not in fsdp.memory and "gradients" not in fsdp.memory
    assert fsdp.memory["student weights, gradients, AdamW moments (fp32, 1/4 each)"] == 16 * n / 4
    assert fsdp.memory["FSDP gathered root unit (weights + gradients)"] == 8 * v * h  # tied: one table
    assert fsdp.memory["FSDP gathered decoder layers (2, weights + gradients)"] == pytest.approx(16 * (n - v * h) / 4)
    assert fsdp.peak_bytes < ddp.peak_bytes
    assert estimate(cfg, processes=1, tflops=1.0, fsdp=True).memory.keys() == estimate(cfg, tflops=1.0).memory.keys()


def test_cli_plan_warns_and_exits_1_when_it_does_not_fit(tmp_path, capsys):
    recipe = write_recipe(tmp_path, tmp_path / "run")
    js = tmp_path / "plan.json"
    assert main(["plan", str(recipe), "--memory-gb", "64", "--tflops", "1", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "peak estimate" in out and "fits" in out and json.loads(js.read_text())["fits"]
    assert main(["plan", str(recipe), "--memory-gb", "0.01", "--tflops", "1"]) == 1
    assert "warning: the run needs about" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["plan", str(recipe), "--memory-gb", "-3"])
    assert e.value.code == 2


def test_teacher_on_another_device_moves_its_memory(tmp_path):
    recipe = write_recipe(tmp_path, tmp_path / "run")
    here = estimate(load_config(recipe), tflops=1.0, device="cpu")
    assert any(k.startswith("teacher weights") for k in here.memory) and not here.teacher_memory
    cfg = load_config(recipe)
    cfg.teacher.device = "cuda:1"  # a plan may describe a machine other than this one
    away = estimate(cfg, tflops=1.0, device="cuda", memory_gb=80)
    assert not any(k.startswith("teacher weights") for k in away.memory)
    assert any(k.startswith("teacher weights") for k in away.teacher_memory) and "teacher LM head copy" in away.memory


def test_gguf_header_reader_matches_transformers(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("llama.embedding_length", 64), ("llama.block_count", 2), ("llama.feed_forward_length", 128),
                       ("llama.attention.head_count", 4), ("llama.attention.head_count_kv", 2),
                       ("llama.context_length", 256)):
        w.add_uint32(key, value)
    w.add_token_list([f"t{i}" for i in range(100)])
    w.add_tensor("token_embd.weight", np.zeros((100, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    kv, arrays, names = read_gguf_header(path)
    assert kv["llama.block_count"] == 2 and arrays["tokenizer.ggml.tokens"] == 100 and names == ["token_embd.weight"]
    cfg = gguf_config(path)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.tie_word_embeddings) == (64, 2, 100, True)
    total, matmul = count_params(cfg)
    assert total == matmul > 100 * 64


def test_overrides_may_follow_options(tmp_path, capsys):
    """argparse alone rejects `plan r.yaml --tflops 1 key=value`; the CLI takes such words as overrides, in order."""
    recipe = write_recipe(tmp_path, tmp_path / "run")
    js = tmp_path / "plan.json"
    assert main(["plan", str(recipe), "train.micro_batch_size=2", "--tflops", "1", "train.micro_batch_size=16",
                 "--memory-gb", "64", "--json", str(js)]) == 0
    mem = json.loads(js.read_text())["memory_bytes"]
    assert any(k.startswith("activations (16 x 32 tokens)") for k in mem)
    with pytest.raises(SystemExit):
        main(["plan", str(recipe), "--tflops", "1", "not-an-override"])
    assert "unrecognized arguments: not-an-override" in capsys.readouterr().err
