"""teacher.kind api_logprobs against the REAL llama.cpp server (SmolLM2-135M-Instruct Q4_1), slow tier.

Generates answers with top_logprobs from the served model, then distills a tiny student from the
generated file with the sparse KD term. Run: ``pytest -m llamacpp tests/test_api_distill_llamacpp.py``
(about 2-4 minutes on 2 busy cores; skips without llama-cpp-python[server]).
"""

from __future__ import annotations

import json

import pytest

from distillery.api import generate_dataset
from distillery.api.local_server import have_llamacpp_server, llamacpp_server, smollm2_gguf

pytestmark = [pytest.mark.llamacpp,
              pytest.mark.skipif(not have_llamacpp_server(), reason="llama-cpp-python[server] not installed")]

TOPICS = ["the sea", "a forest", "the moon", "bread", "a river", "winter", "a library", "the wind", "a garden", "rain"]


def test_generate_with_top_logprobs_then_distill_with_sparse_kd(tmp_path):
    from distillery.config import RunConfig
    from distillery.train import distill

    with (tmp_path / "prompts.jsonl").open("w") as fh:
        for i in range(24):
            fh.write(json.dumps({"prompt": f"Describe {TOPICS[i % 10]} in one sentence ({i // 10 + 1})."}) + "\n")
    with llamacpp_server(smollm2_gguf()) as url:
        gen = generate_dataset({"base_url": url, "model": "teacher", "api_key_env": "DISTILLERY_TEST_NO_KEY",
                                "prompts": [str(tmp_path / "prompts.jsonl")], "output": str(tmp_path / "teacher.jsonl"),
                                "concurrency": 2, "timeout": 120.0, "progress_every": 0,
                                "sampling": {"max_tokens": 24, "sample_temperature": 0.7, "seed": 0, "logprobs": True,
                                             "top_logprobs": 5, "extra_body": {"repeat_penalty": 1.0}}})
    assert gen["done"] == 24 and gen["failed"] == 0
    cfg = RunConfig.model_validate({
        "teacher": {"kind": "api_logprobs", "source": "smollm2"},
        "student": {"model": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}},
        "data": {"train": [str(tmp_path / "teacher.jsonl")], "seq_len": 96, "val_fraction": 0.2},
        "loss": {"kd": "forward_kl", "kd_weight": 1.0, "ce_weight": 1.0},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 40, "micro_batch_size": 4, "lr": 1e-2,
                  "warmup_steps": 2, "eval_every": 0, "save_every": 0, "progress": False}})
    summary = distill(cfg)
    api = summary["api_teacher"]
    print(f"\napi_logprobs on llama.cpp output: {api}\nvalidation: {summary['validation']}")
    assert api["shared_tokenizer"] and api["top_k"] == 5
    assert api["kd_records"] >= 20 and api["kd_tokens"] >= 20 * 10  # lost-bytes records are the exception
    assert api["unmapped_tokens"] == 0 and api["unmapped_alternatives"] == 0
    m = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"kd"' in x]
    assert all(x["kd"] > 0 for x in m)
    assert sum(x["kd"] for x in m[-5:]) < 0.85 * sum(x["kd"] for x in m[:5])
    assert summary["validation"]["kl_teacher_student"] > 0
