"""student.lora: distill into a peft LoRA adapter on a pretrained student. Only the adapter trains (the optimizer
holds only A and B), the saved student is the merged plain model (W + alpha/r · B A, exporters read it), the
adapter alone is saved under the run folder and loads with peft onto the pretrained folder to the same logits,
and a resumed LoRA run ends where an uninterrupted one does."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

pytest.importorskip("peft")

from distillery.config import load_config  # noqa: E402
from distillery.errors import DistilleryError  # noqa: E402
from distillery.train import distill  # noqa: E402
from helpers_run import run_metrics, write_recipe  # noqa: E402
from tiny import tiny_llama, tiny_tokenizer  # noqa: E402

LORA = {"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def pretrained(root):
    d = root / "pretrained"
    if not (d / "config.json").exists():
        tiny_llama(vocab_size=512, hidden=32, layers=2, heads=2, kv_heads=1, ffn=64, seed=5).save_pretrained(d)
        tiny_tokenizer(512).save_pretrained(d)
    return d


def lora_recipe(root, out, **train):
    return write_recipe(root, out, student={"init": "pretrained", "pretrained": str(pretrained(root)), "model": {},
                                            "lora": LORA},
                        train={"max_steps": 4, "save_every": 2, "eval_every": 2, "lr": 1e-2, **train})


def test_lora_run_trains_only_the_adapter_and_saves_merged(tmp_path):
    import peft

    run = tmp_path / "run"
    summary = distill(load_config(lora_recipe(tmp_path, run)))
    base = load_file(str(pretrained(tmp_path) / "model.safetensors"))
    merged = load_file(str(run / "student" / "model.safetensors"))
    assert set(merged) == set(base)  # a plain model: no lora_ / base_layer keys
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    targeted = {k for k in base if any(f".{m}.weight" in k for m in LORA["target_modules"])}
    assert changed == targeted and len(targeted) == 2 * 3  # 2 layers x (q, v, down): nothing else moved
    for k in targeted:  # each update is (alpha / r) B A: rank <= r
        rank = int(torch.linalg.matrix_rank((merged[k] - base[k]).double(), atol=1e-7))
        assert 1 <= rank <= LORA["rank"], (k, rank)

    # the optimizer held the adapter only: A and B of 6 layers
    opt = torch.load(run / "checkpoints" / "step-00000004" / "optimizer.pt", weights_only=True)
    assert len(opt["state"]) == 12
    n_adapter = sum(p.numel() for p in [*opt["state"].values()] for p in [p["exp_avg"]])
    # q: (32->32), v: (32->16), down: (64->32); A (r, in) + B (out, r), r = 4, two layers
    assert n_adapter == 2 * 4 * ((32 + 32) + (32 + 16) + (64 + 32))

    # peft loads the saved adapter onto the pretrained folder: same logits as the merged student
    student = AutoModelForCausalLM.from_pretrained(run / "student", dtype=torch.float32).eval()
    base_model = AutoModelForCausalLM.from_pretrained(pretrained(tmp_path), dtype=torch.float32).eval()
    ids = torch.randint(4, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = base_model(ids).logits
        adapted = peft.PeftModel.from_pretrained(base_model, str(run / "adapter")).eval()  # injects in place
        torch.testing.assert_close(adapted(ids).logits, student(ids).logits, rtol=0, atol=1e-5)
        assert (before - student(ids).logits).abs().max() > 1e-3  # and the adapter did change the model
    assert summary["validation"]["kl_teacher_student"] > 0


def test_lora_resume_equals_uninterrupted(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    distill(load_config(lora_recipe(tmp_path, full)))
    distill(load_config(lora_recipe(tmp_path, part)))
    shutil.rmtree(part / "checkpoints" / "step-00000004")  # as if it crashed after the step-2 checkpoint
    shutil.rmtree(part / "student")
    shutil.rmtree(part / "adapter")
    distill(load_config(lora_recipe(tmp_path, part)), resume=True)
    a, b = load_file(str(full / "student" / "model.safetensors")), load_file(str(part / "student" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [m["loss"] for m in run_metrics(full) if "loss" in m] == [m["loss"] for m in run_metrics(part) if "loss" in m]
    ad_a = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    ad_b = load_file(str(part / "adapter" / "adapter_model.safetensors"))
    assert ad_a.keys() == ad_b.keys() and all(torch.equal(ad_a[k], ad_b[k]) for k in ad_a)


def test_lora_refusals_in_one_line(tmp_path):
    recipe = write_recipe(tmp_path, tmp_path / "r", student={"lora": {"rank": 4}})
    with pytest.raises(DistilleryError, match=r"student.lora adapts a student that already has weights"):
        load_config(recipe)
    with pytest.raises(DistilleryError, match=r"student.lora and qat.enabled do not go together"):
        load_config(lora_recipe(tmp_path, tmp_path / "q"), ["qat.enabled=true"])
    with pytest.raises(DistilleryError, match=r"student.lora.rank.*greater than 0"):
        load_config(lora_recipe(tmp_path, tmp_path / "z"), ["student.lora.rank=0"])
    bad = write_recipe(tmp_path, tmp_path / "t", student={"init": "pretrained", "pretrained": str(pretrained(tmp_path)),
                                                          "model": {}, "lora": {"target_modules": ["nope_proj"]}})
    with pytest.raises(DistilleryError, match=r"^student.lora: .*nope_proj") as exc:
        distill(load_config(bad))
    assert "\n" not in str(exc.value)
    head = write_recipe(tmp_path, tmp_path / "h", student={"init": "pretrained", "pretrained": str(pretrained(tmp_path)),
                                                           "model": {}, "lora": {"target_modules": ["lm_head"]}})
    with pytest.raises(DistilleryError, match=r"an adapter on lm_head is not supported"):
        distill(load_config(head))
