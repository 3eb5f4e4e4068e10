"""Teacher cache: round trip, k = V parity with the live loss, mismatch and corruption errors, CachedTeacher."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from distillery.cache import CacheReader, cache_info, write_cache
from distillery.teachers import CachedTeacher
from distillery.cache.codec import Encoding
from distillery.errors import DistilleryError
from distillery.targets import sparse_from_logits
from distillery.losses import forward_kl
from test_cache_support import BlockDataset, TinyTeacher, collate, forward_kl_dense, forward_kl_sparse

V, T = 512, 16
INFO = {"teacher": {"name": "tiny", "weights_hash": "w0"}, "tokenizer_hash": "tok0",
        "data_fingerprint": {"files": [{"path": "a.txt", "sha256": "f0"}], "seq_len": T, "packing": "concat"}}


def _teacher():
    model = TinyTeacher(V).eval()
    return model, (lambda batch: model(batch["input_ids"]))


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    """12 train blocks + 5 val blocks, k = 8, shards of 4 blocks (the last one short)."""
    out = tmp_path_factory.mktemp("cache") / "c"
    model, fn = _teacher()
    splits = {"train": BlockDataset(12, T, V, seed=1), "val": BlockDataset(5, T, V, seed=2)}
    summary = write_cache(fn, splits, out, k=8, loss_temperature=2.0, manifest_info=INFO, shard_blocks=4,
                          batch_size=3, progress=False)
    return out, model, splits, summary


@pytest.mark.parametrize("encoding", ["sqrt_u8", "sqrt_u16", "float16"])
def test_round_trip(tmp_path, encoding):
    model, fn = _teacher()
    ds = BlockDataset(10, T, V, seed=3)
    s = write_cache(fn, ds, tmp_path / "c", k=16, loss_temperature=1.5, manifest_info=INFO, shard_blocks=3,
                    batch_size=2, logprob_encoding=encoding, progress=False)
    assert s["complete"] and s["tokens_written"] == 10 * T and s["shards_written"] == 4
    reader = CacheReader(tmp_path / "c")
    order = torch.tensor([9, 0, 4, 3, 8, 1])  # across shards, out of order
    got = reader.targets(order)
    batch = collate(ds, order)
    with torch.no_grad():
        ref = sparse_from_logits(model(batch["input_ids"]), 16, 1.5)
    mask = batch["labels"] != -100
    assert torch.equal(got.mask, mask) and got.loss_temperature == 1.5 and got.vocab_size == V
    assert got.topk_ids.dtype == torch.int64 and got.topk_logprobs.dtype == torch.float32
    assert torch.equal(got.topk_ids[mask], ref.topk_ids[mask])  # ids are exact
    bound = torch.from_numpy(reader.encoding.max_logprob_error(ref.topk_logprobs.numpy())).float()
    assert ((got.topk_logprobs - ref.topk_logprobs).abs() <= bound)[mask].all()
    tail_err = (got.tail_logprob - ref.tail_logprob).abs()[mask]
    assert (tail_err <= ref.tail_logprob.abs()[mask] * 2 ** -11 + 1e-6).all()  # float16
    assert (got.topk_ids[~mask] == 0).all()  # masked positions hold zeros
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["encoding"]["logprobs"] == encoding


def test_lazy_dense_teacher_equals_logits(tmp_path):
    """A live ``Teacher`` hands over hidden states + LM head; the cache equals the one from plain logits."""
    from distillery.teachers import HFTeacher as Teacher
    from tiny import tiny_llama

    model = tiny_llama(V, seed=0)
    teacher = Teacher(model=model, tokenizer=None, name="tiny", source="tiny", device=torch.device("cpu"))
    ds = BlockDataset(4, T, V, seed=4)
    a = write_cache(lambda b: teacher.targets(b), ds, tmp_path / "a", k=8, loss_temperature=1.0, manifest_info=INFO,
                    shard_blocks=4, batch_size=2, progress=False)
    b = write_cache(lambda b: model(input_ids=b["input_ids"]).logits, ds, tmp_path / "b", k=8, loss_temperature=1.0,
                    manifest_info=INFO, shard_blocks=4, batch_size=2, progress=False)
    assert a["complete"] and b["complete"]
    ta, tb = CacheReader(tmp_path / "a").targets([0, 1, 2, 3]), CacheReader(tmp_path / "b").targets([0, 1, 2, 3])
    assert torch.equal(ta.topk_ids[ta.mask], tb.topk_ids[tb.mask])
    assert torch.allclose(ta.topk_logprobs, tb.topk_logprobs, atol=0.02)


@pytest.mark.parametrize("encoding,loss_tol,grad_tol", [("float16", 1e-4, 5e-3), ("sqrt_u16", 1e-4, 1e-3),
                                                        ("sqrt_u8", 5e-3, 5e-2)])
def test_k_equals_vocab_matches_live_loss_and_gradient(tmp_path, encoding, loss_tol, grad_tol):
    """k = V: the cached sparse forward KL equals the dense live one (loss and gradient), up to the encoding."""
    teacher, fn = _teacher()
    ds = BlockDataset(6, T, V, seed=5)
    write_cache(fn, ds, tmp_path / "c", k=V, loss_temperature=2.0, manifest_info=INFO, shard_blocks=6,
                batch_size=6, logprob_encoding=encoding, progress=False)
    cached = CacheReader(tmp_path / "c").targets(torch.arange(6))
    assert cached.width == V and (cached.tail_logprob[cached.mask] < -13).all()  # empty up to float32 rounding
    batch = collate(ds, torch.arange(6))
    mask = batch["labels"] != -100
    student = TinyTeacher(V, seed=7, scale=2.0)
    losses, grads = [], []
    for target in ("live", "cache"):
        logits = student(batch["input_ids"]).detach().requires_grad_(True)
        with torch.no_grad():
            t_logits = teacher(batch["input_ids"])
        teacher_signal = t_logits if target == "live" else cached
        per_tok = forward_kl(logits, teacher_signal, loss_temperature=2.0)  # distillery.losses: dense or sparse
        loss = per_tok[mask].sum() / mask.sum()
        loss.backward()
        losses.append(loss.item())
        grads.append(logits.grad[mask])
    assert losses[0] > 0.05
    with torch.no_grad():  # the inline reference formulas agree with distillery.losses
        ref = forward_kl_dense(student(batch["input_ids"]), teacher(batch["input_ids"]), 2.0)[mask].mean()
        ref_sparse = forward_kl_sparse(student(batch["input_ids"]), cached)[mask].mean()
    assert abs(ref.item() - losses[0]) < 1e-5 * losses[0] and abs(ref_sparse.item() - losses[1]) < 1e-4 * losses[0]
    assert abs(losses[1] - losses[0]) <= loss_tol * losses[0]  # relative; measured 2e-5 / 6e-6 / 2e-3
    assert (grads[1] - grads[0]).norm() <= grad_tol * grads[0].norm()  # measured 1e-3 / 1.3e-4 / 3.3e-2


def test_check_names_each_difference(small_cache):
    out, *_ = small_cache
    reader = CacheReader(out)
    reader.check({"tokenizer_hash": "tok0", "seq_len": T, "k": 8, "loss_temperature": 2.0,
                  "data_fingerprint": INFO["data_fingerprint"], "teacher": INFO["teacher"]})  # all equal: passes
    cases = [({"tokenizer_hash": "tok1"}, "tokenizer hash"),
             ({"seq_len": 32}, "packing \\(seq_len\\)"),
             ({"data_fingerprint": {**INFO["data_fingerprint"], "seq_len": 32}}, "data fingerprint at 'seq_len'"),
             ({"data_fingerprint": {**INFO["data_fingerprint"], "files": [{"path": "a.txt", "sha256": "XX"}]}},
              "data fingerprint at 'files\\[0\\].sha256'"),
             ({"k": 16}, "k \\(top-k"),
             ({"loss_temperature": 1.0}, "loss_temperature"),
             ({"teacher": {"name": "tiny", "weights_hash": "w1"}}, "teacher at 'weights_hash'")]
    for expected, name in cases:
        with pytest.raises(DistilleryError, match=name):
            reader.check(expected)
    # a file is known by its bytes (size, sha256), not by where it lies: the same file elsewhere passes
    moved = {**INFO["data_fingerprint"], "files": [{"path": "/elsewhere/b.txt", "sha256": "f0"}]}
    reader.check({"data_fingerprint": moved})


def test_rewriting_with_other_settings_is_refused(small_cache):
    out, model, splits, _ = small_cache
    with pytest.raises(DistilleryError, match="already holds a teacher cache with k = 8"):
        write_cache(lambda b: model(b["input_ids"]), splits, out, k=16, loss_temperature=2.0, manifest_info=INFO,
                    shard_blocks=4, progress=False)
    again = write_cache(lambda b: model(b["input_ids"]), splits, out, k=8, loss_temperature=2.0, manifest_info=INFO,
                        shard_blocks=4, batch_size=3, progress=False)
    assert again["shards_written"] == 0 and again["tokens_skipped"] == 17 * T and again["complete"]


def test_a_folder_of_other_files_is_refused(tmp_path):
    """``distillery cache --out DIR`` into a folder that holds no cache (``--out ~/notes``) stops before writing."""
    model, fn = _teacher()
    splits = {"train": BlockDataset(4, T, V, seed=1)}
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(DistilleryError, match=r"holds files that are not a teacher cache's \(notes.txt\)"):
        write_cache(fn, splits, tmp_path, k=8, loss_temperature=1.0, manifest_info=INFO, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert write_cache(fn, splits, empty, k=8, loss_temperature=1.0, manifest_info=INFO, progress=False)["complete"]


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_corrupt_and_truncated_shards_are_named(small_cache, tmp_path):
    out, *_ = small_cache
    bad = _copy(out, tmp_path / "flip")
    shard = bad / "train" / "00001.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    reader = CacheReader(bad)
    reader.targets([0])  # shard 0 is fine
    with pytest.raises(DistilleryError, match="train/00001.arrow is corrupt"):
        reader.targets([5])
    with pytest.raises(DistilleryError, match="00001.arrow is corrupt"):
        cache_info(bad, verify=True)
    cut = _copy(out, tmp_path / "cut")
    shard = cut / "val" / "00001.arrow"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DistilleryError, match="val/00001.arrow has .* bytes.*truncated"):
        CacheReader(cut)


def test_incomplete_cache_is_refused(tmp_path):
    model, fn = _teacher()
    ds = BlockDataset(8, T, V, seed=6)
    s = write_cache(fn, ds, tmp_path / "c", k=4, loss_temperature=1.0, manifest_info=INFO, shard_blocks=2,
                    rank=1, world_size=2, progress=False)
    assert not s["complete"] and s["committed_shards"] == 2 and s["expected_shards"] == 4
    with pytest.raises(DistilleryError, match="incomplete: 2 of 4 shards"):
        CacheReader(tmp_path / "c")
    assert "INCOMPLETE (2/4 shards committed)" in cache_info(tmp_path / "c")


def test_cached_teacher_checks_tokens_and_mask(small_cache):
    out, model, splits, _ = small_cache
    teacher = CachedTeacher(out)
    batch = collate(splits["train"], [7, 2])
    t = teacher.targets(batch, vocab_size=V)
    assert t.is_sparse and t.shape == (2, T) and t.width == 8 and torch.equal(t.mask, batch["labels"] != -100)
    val = teacher.eval_teacher()
    assert val is not None and val.targets(collate(splits["val"], [4])).shape == (1, T)
    changed = {**batch, "input_ids": batch["input_ids"].clone()}
    changed["input_ids"][1, 3] += 1
    with pytest.raises(DistilleryError, match="block 2 of split 'train' has other tokens"):
        teacher.targets(changed)
    unmasked = {**batch, "labels": batch["input_ids"].clone()}  # block 7 had a masked prompt
    with pytest.raises(DistilleryError, match="block 7 .* stored no targets"):
        teacher.targets(unmasked)
    with pytest.raises(DistilleryError, match="not in the teacher cache"):
        teacher.targets(collate(BlockDataset(1, T, V, index_offset=99), [0]))
    with pytest.raises(DistilleryError, match="vocabulary entries"):
        teacher.targets(batch, vocab_size=V - 1)


def test_shards_are_plain_arrow_streams(small_cache):
    """Another tool reads a shard with nothing but pyarrow and the documented formula."""
    out, model, splits, _ = small_cache
    table = pa.ipc.open_stream(pa.memory_map(str(out / "train" / "00000.arrow"))).read_all()
    assert table.column_names == ["index", "digest", "mask", "ids", "logprobs", "tail"]
    assert table.schema.field("ids").type == pa.list_(pa.list_(pa.uint16(), 8), T)
    meta = json.loads(table.schema.metadata[b"distillery"])
    assert meta["k"] == 8 and meta["split"] == "train"
    codes = np.asarray(table.column("logprobs")[1].as_py(), dtype=np.float64)  # (T, K) for block 1
    lp = -32.0 * (codes / 255.0) ** 2
    with torch.no_grad():
        ref = sparse_from_logits(model(splits["train"][1]["input_ids"][None]), 8, 2.0)
    mask = splits["train"][1]["labels"] != -100
    assert np.allclose(lp[mask.numpy()], ref.topk_logprobs[0][mask].numpy(), atol=0.07)
    assert table.column("ids")[1].as_py()[-1] == ref.topk_ids[0, -1].tolist()


def test_cli_info(small_cache, capsys):
    from distillery.cli import main

    out, *_ = small_cache
    assert main(["cache", "--info", str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    assert "complete (5/5 shards committed); sha256 verified" in text and "top-8 of 512" in text
    assert main(["cache", "--info", str(out / "nope")]) == 2


def test_read_throughput_is_measured(small_cache):
    out, *_ = small_cache
    r = CacheReader(out).measure_read_throughput(batch_size=4, batches=5)
    assert r["warm_tok_per_s"] > 0 and r["tokens_per_batch"] == 4 * T


def test_encoding_choice():
    assert Encoding.choose(65_536).ids == "uint16" and Encoding.choose(65_537).ids == "uint32"
    assert Encoding.choose(49_152).bytes_per_position(32) == 98
    with pytest.raises(DistilleryError, match="log-prob encoding"):
        Encoding.choose(100, "int4")


def test_blocks_keyed_by_their_index_field(tmp_path):
    """Rows are found by the dataset's ``index`` field, not by position (here: reversed numbering)."""

    class Reversed(BlockDataset):
        def __getitem__(self, i):
            return {**super().__getitem__(i), "index": torch.tensor(len(self) - 1 - i)}

    model, fn = _teacher()
    ds = Reversed(7, T, V, seed=8)
    write_cache(fn, ds, tmp_path / "c", k=4, loss_temperature=1.0, manifest_info=INFO, shard_blocks=3,
                progress=False)
    reader = CacheReader(tmp_path / "c")
    assert sorted(reader.indices().tolist()) == list(range(7))
    got = reader.targets([6, 0])  # index 6 is position 0, index 0 is position 6
    with torch.no_grad():
        ref = sparse_from_logits(model(collate(ds, [0, 6])["input_ids"]), 4, 1.0)
    assert torch.equal(got.topk_ids[got.mask], ref.topk_ids[got.mask])


def test_datasets_opens_the_shards(small_cache, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out, *_ = small_cache
    one = datasets.Dataset.from_file(str(out / "train" / "00000.arrow"))
    assert one.num_rows == 4 and one.features["ids"].length == T
    one.set_format("numpy")
    assert one[0:2]["ids"].shape == (2, T, 8)
    every = datasets.load_dataset("arrow", data_files={"train": str(out / "train" / "*.arrow")},
                                  cache_dir=str(tmp_path / "hf"))
    assert sorted(every["train"]["index"]) == list(range(12))


def test_cached_top_k_loss_matches_the_bucket_formula(small_cache):
    """k < V: distillery.losses' sparse forward KL on cached targets == the (K+1)-bucket formula the benchmark uses."""
    out, model, splits, _ = small_cache
    idx = torch.arange(12)
    cached = CacheReader(out).targets(idx)
    batch = collate(splits["train"], idx)
    student = TinyTeacher(V, seed=9, scale=2.0)(batch["input_ids"]).detach()
    got = forward_kl(student, cached)[cached.mask]
    ref = forward_kl_sparse(student, cached)[cached.mask]
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        live = forward_kl_dense(student, model(batch["input_ids"]), 2.0)[cached.mask]
    assert (got <= live + 1e-4).all()  # the bucketed KL never exceeds the dense one
