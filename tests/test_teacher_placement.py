"""Where the teacher lives: a named device (``teacher.device``) or a teacher cache (``teacher.kind: cache``).

Both must work inside the loop. The cache run must never load the teacher model (that is the point:
no teacher weights on any rank), and with ``k = V`` and 16-bit log-probs it must train like the
live teacher up to the cache's quantisation (stated bound per step: |Δ kd| < 2e-3 and |Δ ce| < 1e-2
nats per token, CE identical at step 1 where the students are still equal, same tokens).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from distillery.cli import main
from distillery.config import load_config
from distillery.errors import DistilleryError
from distillery.train import distill
from helpers_run import write_recipe

DATA = {"max_train_blocks": 16, "max_val_blocks": 4}
TRAIN = {"max_steps": 3, "save_every": 0, "eval_every": 0, "eval_batches": 1}


def _train_lines(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_teacher_on_a_named_device_equals_auto(tmp_path):
    auto, named = tmp_path / "auto", tmp_path / "named"
    distill(load_config(write_recipe(tmp_path, auto, data=DATA, train=TRAIN)))
    distill(load_config(write_recipe(tmp_path, named, data=DATA, train=TRAIN), ["teacher.device=cpu"]))
    a, b = load_file(str(auto / "student" / "model.safetensors")), load_file(str(named / "student" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_teacher_device_that_does_not_exist_is_a_one_line_error(tmp_path):
    cfg = load_config(write_recipe(tmp_path, tmp_path / "run", data=DATA, train=TRAIN), ["teacher.device=cuda:7"])
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(DistilleryError, match=r"teacher.device 'cuda:7' does not exist here"):
        distill(cfg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the student goes there, the teacher stays on the CPU")
def test_teacher_on_cpu_student_on_gpu(tmp_path):
    out = tmp_path / "split"
    summary = distill(load_config(write_recipe(tmp_path, out, data=DATA, train=TRAIN), ["teacher.device=cpu"]))
    assert summary["steps"] == 3 and all(torch.isfinite(torch.tensor(m["loss"])) for m in _train_lines(out))


def test_cached_teacher_trains_like_the_live_one_without_loading_it(tmp_path, capsys, monkeypatch):
    live = tmp_path / "live"
    recipe = write_recipe(tmp_path, live, data=DATA, train=TRAIN, loss={"ce_weight": 0.5})
    cache = tmp_path / "cache"
    assert main(["cache", str(recipe), "--out", str(cache), "--k", "512", "--logprob-encoding", "sqrt_u16",
                 "--batch-size", "4", "--no-progress"]) == 0
    capsys.readouterr()
    distill(load_config(recipe))

    def no_teacher(*a, **k):
        raise AssertionError("a run on a teacher cache loaded the teacher model")

    import distillery.teachers.hf as hf

    monkeypatch.setattr(hf, "load_teacher", no_teacher)
    cached = tmp_path / "cached"
    summary = distill(load_config(recipe, ["teacher.kind=cache", f"teacher.cache_path={cache}",
                                           f"train.output_dir={cached}"]))
    assert summary["steps"] == 3 and summary["validation"]["tokens"] > 0
    a, b = _train_lines(live), _train_lines(cached)
    assert a[0]["ce"] == pytest.approx(b[0]["ce"], rel=1e-6)  # same blocks, same initial student
    for x, y in zip(a, b, strict=True):
        assert abs(x["kd"] - y["kd"]) < 2e-3 and abs(x["ce"] - y["ce"]) < 1e-2, (x, y)
        assert x["tokens_seen"] == y["tokens_seen"]
    student_cfg = json.loads((cached / "student" / "config.json").read_text())
    assert student_cfg["vocab_size"] == 512  # inherited from the teacher, not Llama's default 32,000


def test_student_next_to_a_cache_inherits_the_vocabulary_without_a_teacher_folder():
    from distillery.config import TeacherConfig
    from tiny import tiny_tokenizer

    from types import SimpleNamespace

    from distillery.teachers import teacher_config

    cache_like = SimpleNamespace(model=None, tokenizer=tiny_tokenizer(512), vocab_width=512)
    stand_in = teacher_config(TeacherConfig(kind="cache"), cache_like)
    assert stand_in.config.vocab_size == 512 and stand_in.config.eos_token_id == 0
