"""The served teacher against the real llama.cpp server (llama-cpp-python, SmolLM2-135M-Instruct Q4_1), held against
the in-process teacher on the same weights (the GGUF dequantized by transformers). Opt-in tier: ``make test-llamacpp``."""

from __future__ import annotations

import pytest
import torch

from distillery.api.local_server import have_llamacpp_server, llamacpp_server, smollm2_gguf
from distillery.config import DataConfig, TeacherConfig
from distillery.data import build_datasets
from distillery.losses import forward_kl
from distillery.targets import sparse_from_logits
from distillery.teachers import load_teacher, open_teacher

pytestmark = [pytest.mark.llamacpp, pytest.mark.skipif(not have_llamacpp_server(), reason="llama-cpp-python not installed")]
K = 20


def test_llamacpp_served_targets_match_the_in_process_teacher():
    live = load_teacher("smollm2")
    ds = build_datasets(DataConfig(train=["demo:milton"], seq_len=64, val_fraction=0.0, max_train_blocks=8),
                        live.tokenizer).train
    batch = ds.batch(torch.arange(8))
    with llamacpp_server(smollm2_gguf(), n_ctx=512, logits_all=True) as url:
        served = open_teacher(TeacherConfig(kind="served", source="smollm2", base_urls=[url], top_logprobs=K,
                                            concurrency=1))
        assert served.engine == "llamacpp"
        got = served.targets(batch, vocab_size=len(live.tokenizer))
    dense = live.targets(batch, vocab_size=len(live.tokenizer))
    logits = dense.dense_logits(torch.arange(batch["input_ids"].numel())).view(*batch["input_ids"].shape, -1)
    m = batch["labels"] != -100
    want = sparse_from_logits(logits, K, 1.0, vocab_size=len(live.tokenizer), mask=m)
    assert got.mask[m].float().mean().item() >= 0.99  # rows for (almost) every target position
    both = m & got.mask
    top1 = (got.topk_ids[both][:, 0] == want.topk_ids[both][:, 0]).float().mean().item()
    overlap = torch.tensor([len(set(a.tolist()) & set(b.tolist())) / K
                            for a, b in zip(got.topk_ids[both], want.topk_ids[both])]).mean().item()
    print(f"llama.cpp vs in-process: top-1 agreement {top1:.4f}, top-{K} overlap {overlap:.4f}")
    assert top1 >= 0.99 and overlap >= 0.95
    student = torch.randn(*batch["input_ids"].shape, logits.shape[-1], generator=torch.Generator().manual_seed(0))
    want.mask = both
    got.mask = both
    a, b = forward_kl(student, got).sum().item(), forward_kl(student, want).sum().item()
    print(f"forward KL of one batch: served {a:.4f}, in-process sparse {b:.4f} ({(a - b) / b:+.3%})")
    assert abs(a - b) <= 0.01 * abs(b)
