"""2- and 3-bit students: the affine grid equals MLX's ``mx.quantize`` bit for bit, the quantize verb writes
MLX's own tensors, and QAT with distillation through ``distillery distill`` beats post-training rounding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from distillery.config import load_config
from distillery.errors import DistilleryError
from distillery.quantize import affine_quantize, fake_quantize, load_quantized, qat_unwrap, qat_wrap, quantize_model
from distillery.quantize.core import affine_dequantize, pack_bits, unpack_bits
from distillery.quantize.qat import quant_targets
from helpers_run import write_recipe
from tiny import tiny_llama, tiny_tokenizer


def _weights(seed: int = 0) -> torch.Tensor:
    """(48, 256) weights with the cases a grid can get wrong: an outlier, an all-zero group, a
    negative-edged group and a group whose max edge dominates."""
    torch.manual_seed(seed)
    w = torch.randn(48, 256) * 0.05
    w[3, 5], w[4, 70], w[5, 140] = 0.9, -0.7, 1e-9
    w[7, :128] = 0.0
    w[9, :64] = torch.linspace(-0.01, 0.3, 64)
    return w


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_affine_grid_equals_mlx(bits, group_size, dtype):
    """fake_quantize(scheme='affine') == mx.dequantize(mx.quantize(w)), and the packed codes, scales and
    biases are MLX's own arrays (observed: exactly equal; asserted to 1e-6 for the values)."""
    mx = pytest.importorskip("mlx.core")
    w = _weights()
    tdt, mdt = getattr(torch, dtype), getattr(mx, dtype)
    mq, ms, mb = mx.quantize(mx.array(w.numpy()).astype(mdt), group_size=group_size, bits=bits)
    theirs = np.array(mx.dequantize(mq, ms, mb, group_size=group_size, bits=bits).astype(mx.float32))
    ours = fake_quantize(w.to(tdt), bits, group_size, scale_dtype=tdt, scheme="affine").float().numpy()
    assert np.abs(ours - theirs).max() <= 1e-6
    q, s, b = affine_quantize(w, bits, group_size, dtype=tdt)
    assert np.array_equal(pack_bits(q, bits).numpy(), np.array(mq))
    assert np.array_equal(s.float().numpy(), np.array(ms.astype(mx.float32)))
    assert np.array_equal(b.float().numpy(), np.array(mb.astype(mx.float32)))


@pytest.mark.parametrize("bits", [2, 3])
def test_affine_grid_bounds_and_packing(bits):
    """Without MLX: codes in [0, 2^b - 1], zero exact, error within half a step inside each group's range,
    pack/unpack a round trip, and b bits per weight in the packed form."""
    w = _weights(1)
    q, s, b = affine_quantize(w, bits, 32)
    assert int(q.max()) <= 2 ** bits - 1 and q.dtype == torch.uint8
    deq = affine_dequantize(q, s, b)
    assert torch.equal(deq[7, :128], torch.zeros(128))                       # zero groups stay zero
    step = s.abs().repeat_interleave(32, dim=1)
    # MLX moves the far edge so that 0 is a code: the near edge and everything inside stay within s/2
    assert ((deq - w).abs() <= step / 2 + 1e-6).float().mean() > 0.97
    assert torch.equal(unpack_bits(pack_bits(q, bits), bits), q)
    assert pack_bits(q, bits).numel() * 32 == w.numel() * bits
    with pytest.raises(DistilleryError, match="32, 64 or 128"):
        affine_quantize(w, bits, 16)
    with pytest.raises(DistilleryError, match="bits=5"):
        fake_quantize(w, 5, 32)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("student")
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("bits", [2, 3])
def test_quantize_verb_lowbit(student_dir, tmp_path, bits):
    """`distillery quantize --bits 2|3`: affine scheme, weights on the grid, compact file with MLX tensors
    that load_quantized reads back to the same model."""
    from distillery.cli import main

    out = tmp_path / f"q{bits}"
    assert main(["quantize", str(student_dir), "--bits", str(bits), "--out", str(out), "--eval-tokens", "64"]) == 0
    report = json.loads((out / "quantization.json").read_text())
    # 14 linears + the LM head + the embedding, as mlx_lm.convert -q quantizes them
    assert (report["scheme"], report["group_size"], report["quantized_tensors"], report["embeddings"]) == ("affine", 32, 16, True)
    original = AutoModelForCausalLM.from_pretrained(student_dir)
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    w0 = original.model.layers[1].mlp.down_proj.weight
    assert torch.equal(plain.model.layers[1].mlp.down_proj.weight, fake_quantize(w0, bits, 32))
    packed = load_quantized(out)
    ids = torch.randint(0, 512, (1, 24))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, packed(ids).logits)
    from safetensors import safe_open
    with safe_open(str(out / "quantized.safetensors"), "pt") as f:
        qw = f.get_tensor("model.layers.1.mlp.down_proj.qweight")
        assert qw.dtype == torch.uint32 and tuple(qw.shape) == (64, 128 * bits // 32)
    assert report["bytes_packed"] < report["bytes_fp32"]
    assert main(["quantize", str(student_dir), "--bits", "2", "--group-size", "16", "--out", str(tmp_path / "x")]) == 2


def test_lowbit_config_and_wrap_errors():
    """Pydantic constraints of qat.* and qat_wrap's own checks, each a one-line user error."""
    recipe = "configs/smollm2_student.yaml"
    assert load_config(recipe, ["qat.bits=2"]).qat.scheme == "auto"
    for bad, msg in ((["qat.bits=5"], "qat.bits"), (["qat.group_size=48"], "power of two"),
                     (["qat.last_steps=-1"], "qat.last_steps"), (["qat.bits=3", "qat.scheme=symmetric"], "symmetric"),
                     (["qat.bits=2", "qat.group_size=16"], "32, 64 or 128"), (["qat.group_size=0"], "qat.group_size")):
        with pytest.raises(DistilleryError, match=msg):
            load_config(recipe, bad)
    model = tiny_llama()
    with pytest.raises(DistilleryError, match="symmetric"):
        qat_wrap(model, bits=2, scheme="symmetric")
    with pytest.raises(DistilleryError, match="32, 64 or 128"):
        qat_wrap(model, bits=3, group_size=16)
    assert len(qat_wrap(model, bits=3)) == 16                 # + the embedding and the LM head (MLX quantizes them)
    assert "scheme=affine" in repr(model.model.layers[0].self_attn.q_proj.parametrizations.weight[0])
    assert len(qat_unwrap(model)) == 16
    assert len(qat_wrap(model, bits=3, embeddings=False)) == 14 and len(qat_unwrap(model)) == 14


def _kl_to_teacher(teacher_dir, student, ids) -> float:
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    with torch.no_grad():
        t = torch.log_softmax(teacher(ids).logits, -1)
        s = torch.log_softmax(student(ids).logits, -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def test_qat_distill_2bit_beats_post_training_rounding(tmp_path):
    """From the same distilled student: 2-bit QAT with distillation (`distill` with qat.enabled, the whole
    run) ends with a quantized student closer to the teacher than rounding the start weights, and
    `quantize --bits 2` of its output is exactly the weights its last forward saw."""
    from distillery.train import distill

    base = tmp_path / "base"
    distill(load_config(str(write_recipe(tmp_path, base, train={"max_steps": 12, "eval_every": 0, "save_every": 12})), []))
    qat = tmp_path / "qat"
    recipe = write_recipe(tmp_path, qat, student={"init": "pretrained", "pretrained": str(base / "student")},
                          qat={"enabled": True, "bits": 2, "group_size": 32, "last_steps": 12},
                          train={"max_steps": 12, "lr": 2e-3, "warmup_steps": 0, "eval_every": 0, "save_every": 12})
    distill(load_config(str(recipe), []))
    ptq = quantize_model(base / "student", bits=2, out_dir=tmp_path / "ptq", eval_tokens=0)
    qq = quantize_model(qat / "student", bits=2, out_dir=tmp_path / "qq", eval_tokens=0)
    assert ptq["scheme"] == qq["scheme"] == "affine"
    latent = AutoModelForCausalLM.from_pretrained(qat / "student").eval()
    quant = AutoModelForCausalLM.from_pretrained(tmp_path / "qq").eval()
    qat_wrap(latent, bits=2)                          # the training forward: fake-quantized latent weights
    torch.manual_seed(0)
    ids = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        assert torch.allclose(latent(ids).logits, quant(ids).logits, atol=1e-5)
    teacher_dir = tmp_path / "teacher"
    kl_ptq = _kl_to_teacher(teacher_dir, AutoModelForCausalLM.from_pretrained(tmp_path / "ptq").eval(), ids)
    kl_qat = _kl_to_teacher(teacher_dir, quant, ids)
    kl_fp32 = _kl_to_teacher(teacher_dir, AutoModelForCausalLM.from_pretrained(base / "student").eval(), ids)
    assert kl_qat < kl_ptq and kl_fp32 < kl_ptq


def test_clip_search_lowers_error_and_qat_bakes_it():
    """clip='mse': per-group squared error never above the plain grid's; after QAT with it, qat_unwrap
    writes the clamp into the latent weights, so the plain grid (what MLX's mx.quantize computes on the
    saved weights) reproduces the wrapped forward exactly."""
    w = _weights(2)
    plain, clipped = fake_quantize(w, 2, 32), fake_quantize(w, 2, 32, clip="mse")
    per_group = lambda x: ((x - w) ** 2).reshape(48, 8, 32).sum(-1)  # noqa: E731
    assert bool((per_group(clipped) <= per_group(plain) + 1e-12).all())
    assert float(per_group(clipped).sum()) < 0.9 * float(per_group(plain).sum())   # the outlier rows gain most
    with pytest.raises(DistilleryError, match="affine"):
        fake_quantize(w, 4, 32, scheme="symmetric", clip="mse")
    model = tiny_llama()
    qat_wrap(model, bits=2, clip="mse")
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        wrapped_logits = model(ids).logits
    qat_unwrap(model)
    with torch.no_grad():
        for mod in quant_targets(model, embeddings=True).values():   # linears, LM head, embedding
            mod.weight.copy_(fake_quantize(mod.weight, 2, 32))
        assert torch.equal(model(ids).logits, wrapped_logits)


@pytest.mark.parametrize("bits", [2, 3])
def test_mlx_lm_convert_runs_our_grid(student_dir, tmp_path, bits):
    """`mlx_lm.convert -q` of a (QAT-trained) student's fp32 folder puts every linear layer on exactly our
    grid, and `quantize`'s packed tensors are MLX's own. Converting the *dequantized* output folder instead
    would round twice: the affine grid is not idempotent (seen: ~7 % of 3-bit groups move)."""
    mx = pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    from mlx_lm.convert import convert
    from safetensors import safe_open

    mlx_dir = tmp_path / "mlx"
    convert(str(student_dir), str(mlx_dir), quantize=True, q_bits=bits, q_group_size=32, dtype="float32")
    theirs = mx.load(str(mlx_dir / "model.safetensors"))
    ours = AutoModelForCausalLM.from_pretrained(student_dir)
    quantize_model(student_dir, bits=bits, out_dir=tmp_path / "q", eval_tokens=0)
    with safe_open(str(tmp_path / "q" / "quantized.safetensors"), "pt") as f:
        for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.embed_tokens", "lm_head"):
            w = dict(ours.named_parameters())[name + ".weight"].detach()
            deq = mx.dequantize(theirs[name + ".weight"], theirs[name + ".scales"], theirs[name + ".biases"],
                                group_size=32, bits=bits)
            assert np.array_equal(np.array(deq), fake_quantize(w, bits, 32).numpy())
            assert np.array_equal(np.array(theirs[name + ".weight"]), f.get_tensor(name + ".qweight").numpy())
            assert np.array_equal(np.array(theirs[name + ".biases"]), f.get_tensor(name + ".biases").numpy())
