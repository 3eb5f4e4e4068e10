"""The served teacher against the real llama.cpp server (llama-cpp-python), held against the in-process teacher.

Parity on the same weights: SmolLM2-135M-Instruct dequantized to fp32 (the in-process teacher) and written back to an
f32 GGUF with distillery's own exporter, served by llama.cpp. The shipped Q4_1 file served as is is measured too: there
llama.cpp multiplies 4-bit weights with 8-bit-quantized activations, so its distribution differs from the fp32
dequantized model's by more than rounding (printed, with a looser bound). Opt-in tier: ``make test-llamacpp``.
"""

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


@pytest.fixture(scope="module")
def live():
    return load_teacher("smollm2", dtype="float32")


@pytest.fixture(scope="module")
def f32_gguf(live, tmp_path_factory):
    from distillery.export import write_gguf

    out = tmp_path_factory.mktemp("gguf") / "smollm2-f32.gguf"
    write_gguf(live.model, live.tokenizer, out, quant="f32", arch="llama", name="SmolLM2-135M-Instruct")
    return out


def _compare(live, gguf) -> dict:
    ds = build_datasets(DataConfig(train=["demo:milton"], seq_len=64, val_fraction=0.0, max_train_blocks=8),
                        live.tokenizer).train
    batch = ds.batch(torch.arange(8))
    with llamacpp_server(gguf, n_ctx=512, logits_all=True) as url:
        served = open_teacher(TeacherConfig(kind="served", source="smollm2", base_urls=[url], top_logprobs=K,
                                            concurrency=1))
        assert served.engine == "llamacpp"
        got = served.targets(batch, vocab_size=len(live.tokenizer))
    dense = live.targets(batch, vocab_size=len(live.tokenizer))
    logits = dense.dense_logits(torch.arange(batch["input_ids"].numel())).view(*batch["input_ids"].shape, -1)
    m = batch["labels"] != -100
    want = sparse_from_logits(logits, K, 1.0, vocab_size=len(live.tokenizer), mask=m)
    both = m & got.mask
    top1 = (got.topk_ids[both][:, 0] == want.topk_ids[both][:, 0]).float().mean().item()
    overlap = torch.tensor([len(set(a.tolist()) & set(b.tolist())) / K
                            for a, b in zip(got.topk_ids[both], want.topk_ids[both])]).mean().item()
    student = torch.randn(*batch["input_ids"].shape, logits.shape[-1], generator=torch.Generator().manual_seed(0))
    want.mask = got.mask = both
    a, b = forward_kl(student, got).sum().item(), forward_kl(student, want).sum().item()
    res = {"rows": got.mask[m].float().mean().item(), "top1": top1, "overlap": overlap, "kl_rel": (a - b) / b,
           "first_row": bool(got.mask[:, 0].any())}
    print(f"{gguf.name}: rows {res['rows']:.3f}, top-1 {top1:.4f}, top-{K} overlap {overlap:.4f}, "
          f"batch forward KL {a:.2f} vs {b:.2f} ({res['kl_rel']:+.3%})")
    return res


def test_llamacpp_served_f32_weights_match_the_in_process_teacher(live, f32_gguf):
    r = _compare(live, f32_gguf)
    # llama-cpp-python reports no row after token 0, and may re-tokenize a block's cut end otherwise
    assert not r["first_row"] and r["rows"] >= 0.9
    assert r["top1"] >= 0.99 and r["overlap"] >= 0.99  # top-k ids agree on >= 99% of positions
    assert abs(r["kl_rel"]) <= 0.01  # the forward-KL loss of one batch within 1%


def test_llamacpp_served_q4_1_file_is_close_to_its_dequantized_weights(live):
    r = _compare(live, smollm2_gguf())
    assert r["top1"] >= 0.9 and abs(r["kl_rel"]) <= 0.05
