"""``teacher.kind: served``: request/response formats (vLLM, llama.cpp), parity with the in-process teacher on the
same weights, training through it (off- and on-policy), a server that dies mid-run, prefetch, cache and eval.

The vLLM-format server (``scoring_server.py``) computes real prompt log-probs with a real tiny model; the llamacpp
tier (``test_served_llamacpp.py``) runs the same parity against the real llama.cpp server.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from distillery.config import TeacherConfig, load_config
from distillery.errors import DistilleryError
from distillery.losses import forward_kl
from distillery.targets import sparse_from_logits
from distillery.teachers import load_teacher, open_teacher
from distillery.teachers.served import llamacpp_rows, row_sequence, vllm_rows
from distillery.train import distill
from helpers_run import make_teacher, run_metrics, write_recipe
from scoring_server import ScoringServer
from tiny import tiny_tokenizer

DATA = {"max_train_blocks": 16, "max_val_blocks": 4}
TRAIN = {"max_steps": 4, "save_every": 2, "eval_every": 0, "eval_batches": 1}


def _served(url: str, root, **kw) -> dict:
    return {"kind": "served", "source": str(make_teacher(root)), "base_urls": [url], "max_retries": 0, **kw}


# ------------------------------------------------------------------------------------------- formats

def test_vllm_rows_take_the_next_entry_and_drop_a_low_ranked_prompt_token():
    # the documented shape: None first, then {token id: {logprob, rank, decoded_token}} per prompt token
    choice = {"prompt_logprobs": [
        None,
        {"7": {"logprob": -0.2, "rank": 1, "decoded_token": " be"}, "9": {"logprob": -1.9, "rank": 2, "decoded_token": " a"},
         "4": {"logprob": -6.0, "rank": 31, "decoded_token": " or"}},  # the prompt token itself, ranked 31st
        {"token_id:4": {"logprob": -0.1, "rank": 1, "decoded_token": " or"},
         "token_id:8": {"logprob": -2.5, "rank": 2, "decoded_token": ","}},
    ]}
    rows = vllm_rows(choice, [3, 4, 4], k=2)
    assert rows == [[(-0.2, 7), (-1.9, 9)], [(-0.1, 4), (-2.5, 8)]]
    with pytest.raises(DistilleryError, match="prompt_logprobs"):
        vllm_rows({"prompt_logprobs": None}, [3, 4, 4], k=2)


def test_llamacpp_rows_read_the_distribution_after_each_token_and_resync_by_text_offset():
    from distillery.api.targets import token_id_map

    tok = tiny_tokenizer(512)
    seq = tok.encode("To be or not to be, that is")
    pieces = [tok.decode([i]) for i in seq]
    offs = [sum(len(p) for p in pieces[:i]) for i in range(len(seq))]
    ids = token_id_map(tok)
    nxt = pieces[1:] + ["!"]
    # no BOS (as SmolLM2): top_logprobs[i] = top-k after token i, plus an entry llama-cpp-python adds for token i
    # itself read from that same row (dropped); the row after token 0 comes back as None
    tops = [None] + [{nxt[i]: -0.3, pieces[0]: -2.0, pieces[i]: -7.0} for i in range(1, len(seq))]
    choice = {"logprobs": {"tokens": pieces, "top_logprobs": tops, "text_offset": offs}}
    rows = llamacpp_rows(choice, seq, tok, ids, k=2)
    assert rows[0] == []  # lost: no row after token 0
    for t in range(1, len(seq) - 1):
        assert rows[t] == [(-0.3, seq[t + 1]), (-2.0, seq[0])]  # the label of position t is the token after it
    # with a BOS the rows are the distributions of each token, and the generated token is echoed last
    tops_bos = [None] + [{pieces[i]: -0.1, "x": -3.0} for i in range(1, len(seq))] + [{"x": -1.0, "y": -2.0}]
    choice = {"logprobs": {"tokens": pieces + ["!"], "top_logprobs": tops_bos, "text_offset": offs + [offs[-1] + len(pieces[-1])]}}
    rows = llamacpp_rows(choice, seq, tok, ids, k=2, bos=True)
    assert [r[0][1] for r in rows] == seq[1:]
    # the server merged tokens 2 and 3: no server token ends where our token 2 ends (no row there), the rest resync
    m_pieces = pieces[:2] + [pieces[2] + pieces[3]] + pieces[4:]
    m_offs = offs[:3] + offs[4:]
    m_tops = tops[:2] + [tops[3]] + tops[4:]
    rows = llamacpp_rows({"logprobs": {"tokens": m_pieces, "top_logprobs": m_tops, "text_offset": m_offs}}, seq, tok,
                         ids, k=2)
    assert rows[2] == [] and rows[3][0] == (-0.3, seq[4]) and all(rows[t] for t in range(4, len(seq) - 1))
    # another tokenizer: its tokens end elsewhere
    bad = {"logprobs": {"tokens": ["x"] * len(seq), "top_logprobs": tops, "text_offset": [3 * i + 1 for i in range(len(seq))]}}
    with pytest.raises(DistilleryError, match="end where ours do"):
        llamacpp_rows(bad, seq, tok, ids, k=2)


def test_row_sequence_adds_the_last_label_only_when_it_is_a_target():
    ids, labels = torch.tensor([5, 6, 7, 0]), torch.tensor([6, 7, 8, -100])
    assert row_sequence(ids, labels, torch.tensor([1, 1, 1, 0])) == [5, 6, 7, 8]
    assert row_sequence(ids, torch.tensor([6, 7, -100, -100]), torch.tensor([1, 1, 1, 0])) == [5, 6, 7]


# ------------------------------------------------------------------------------------------- parity

def _batch(root, teacher, n=4, seq_len=32):
    from distillery.config import DataConfig
    from distillery.data import build_datasets
    from helpers_run import make_corpus

    ds = build_datasets(DataConfig(train=[str(make_corpus(root))], seq_len=seq_len, val_fraction=0.0,
                                   max_train_blocks=n), teacher.tokenizer).train
    return ds.batch(torch.arange(n))


def test_served_targets_match_the_in_process_teacher(tmp_path):
    live = load_teacher(str(make_teacher(tmp_path)))
    with ScoringServer(live.model) as srv:
        served = open_teacher(TeacherConfig(**_served(srv.base_url, tmp_path, top_logprobs=16)))
        assert served.engine == "vllm" and served.served_model == "teacher"
        batch = _batch(tmp_path, live)
        got = served.targets(batch, vocab_size=512)
    dense = live.targets(batch, vocab_size=512)
    logits = dense.dense_logits(torch.arange(batch["input_ids"].numel())).view(*batch["input_ids"].shape, -1)
    want = sparse_from_logits(logits, 16, 1.0, vocab_size=512, mask=batch["labels"] != -100)
    m = batch["labels"] != -100
    assert torch.equal(got.mask, m)
    agree = (got.topk_ids[m] == want.topk_ids[m]).all(-1).float().mean().item()
    assert agree >= 0.99  # top-k ids (in order) at >= 99% of positions
    torch.testing.assert_close(got.topk_logprobs[m], want.topk_logprobs[m], atol=1e-4, rtol=0)
    student_logits = torch.randn(*batch["input_ids"].shape, 512, generator=torch.Generator().manual_seed(0))
    a = forward_kl(student_logits, got).sum()
    b = forward_kl(student_logits, want).sum()
    assert abs(a.item() - b.item()) <= 0.01 * abs(b.item())  # the forward-KL loss of a batch within 1%


# ------------------------------------------------------------------------------------------- training

def _held_out_kl(run) -> float:
    return [m for m in run_metrics(run) if m.get("split") == "val"][-1]["kl_teacher_student"]


@pytest.mark.parametrize("on_policy", [0.0, 1.0])
def test_a_run_through_the_server_ends_where_the_in_process_run_ends(tmp_path, on_policy):
    live = load_teacher(str(make_teacher(tmp_path)))
    gen = {"on_policy_fraction": on_policy, "max_new_tokens": 8, "prompt_tokens": 8, "collapse_guard": "off"}
    a, b = tmp_path / "live", tmp_path / "served"
    distill(load_config(write_recipe(tmp_path, a, data=DATA, train=TRAIN, generation=gen)))
    # k = V: the tiny random teacher is near uniform, so any smaller top-k drops most of its mass (a property of
    # sparse targets, bounded in the cache tests); here the served path itself is compared, end to end.
    with ScoringServer(live.model) as srv:
        summary = distill(load_config(write_recipe(tmp_path, b, data=DATA, train=TRAIN, generation=gen,
                                                   teacher=_served(srv.base_url, tmp_path, top_logprobs=512))))
    assert summary["steps"] == 4
    ka, kb = _held_out_kl(a), _held_out_kl(b)
    assert abs(ka - kb) <= 0.02 * ka, (ka, kb)  # within 2% of the in-process teacher's held-out KL


def test_a_server_that_dies_stops_the_run_in_one_line_and_resume_gives_the_same_student(tmp_path):
    live = load_teacher(str(make_teacher(tmp_path)))
    ref, run = tmp_path / "ref", tmp_path / "run"
    with ScoringServer(live.model) as srv:
        distill(load_config(write_recipe(tmp_path, ref, data=DATA, train=TRAIN,
                                         teacher=_served(srv.base_url, tmp_path, prefetch=0))))
    # 4 rows a step: the server dies during step 3, after the step-2 checkpoint
    with ScoringServer(live.model, fail_after=10) as srv:
        recipe = write_recipe(tmp_path, run, data=DATA, train=TRAIN, teacher=_served(srv.base_url, tmp_path, prefetch=0))
        with pytest.raises(DistilleryError) as err:
            distill(load_config(recipe))
    msg = str(err.value)
    assert "\n" not in msg and "did not answer" in msg and "step-00000002" in msg and "--resume" in msg
    with ScoringServer(live.model) as srv:
        recipe = write_recipe(tmp_path, run, data=DATA, train=TRAIN, teacher=_served(srv.base_url, tmp_path, prefetch=0))
        distill(load_config(recipe), resume=True)
    wa, wb = load_file(str(ref / "student" / "model.safetensors")), load_file(str(run / "student" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_prefetch_overlaps_requests_and_scores_each_row_once(tmp_path):
    live = load_teacher(str(make_teacher(tmp_path)))
    with ScoringServer(live.model, delay=0.02) as srv:
        distill(load_config(write_recipe(tmp_path, tmp_path / "r", data=DATA, train={**TRAIN, "save_every": 0},
                                         teacher=_served(srv.base_url, tmp_path, prefetch=2, concurrency=4))))
        assert srv.peak_in_flight > 1
        # 4 steps x 4 rows, plus the final validation's 4 rows: nothing scored twice
        assert srv.completions == 4 * 4 + 4


def test_cache_written_from_a_server_serves_a_run(tmp_path, capsys):
    from distillery.cli import main

    live = load_teacher(str(make_teacher(tmp_path)))
    with ScoringServer(live.model) as srv:
        recipe = write_recipe(tmp_path, tmp_path / "r", data=DATA, train=TRAIN,
                              teacher=_served(srv.base_url, tmp_path, top_logprobs=8))
        assert main(["cache", str(recipe), "--out", str(tmp_path / "c"), "--no-progress"]) == 0
    info = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert info["teacher"]["served"] is True and info["k"] == 8
    cached = tmp_path / "cached"
    summary = distill(load_config(recipe, ["teacher.kind=cache", f"teacher.cache_path={tmp_path / 'c'}",
                                           f"train.output_dir={cached}"]))
    assert summary["steps"] == 4
    kd = [m["kd"] for m in run_metrics(cached) if "kd" in m]
    assert len(kd) == 4 and all(0 < x < 10 for x in kd)


def test_bad_served_settings_are_one_line_errors(tmp_path):
    with pytest.raises(DistilleryError, match="base_urls"):
        open_teacher(TeacherConfig(kind="served", source=str(make_teacher(tmp_path))))
    with pytest.raises(DistilleryError, match="did not answer|cannot list"):
        open_teacher(TeacherConfig(kind="served", source=str(make_teacher(tmp_path)),
                                   base_urls=["http://127.0.0.1:9/v1"], max_retries=0, timeout_s=2))
    with pytest.raises(DistilleryError, match="MY_KEY"):
        open_teacher(TeacherConfig(kind="served", source=str(make_teacher(tmp_path)),
                                   base_urls=["http://127.0.0.1:9/v1"], api_key_env="MY_KEY"))
