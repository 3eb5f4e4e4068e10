"""Teacher cache with a sampled tail: round trip, manifest, determinism, old caches, fallbacks, defaults."""

from __future__ import annotations

import hashlib
import json
import shutil
from types import SimpleNamespace

import pyarrow as pa
import pytest
import torch

from distillery.cache import CacheReader, cache_info, write_cache
from distillery.teachers import CachedTeacher
from distillery.cache.command import default_k_and_samples
from distillery.cache.sampling import SAMPLER, tail_uniforms
from distillery.errors import DistilleryError
from distillery.losses import forward_kl, reverse_kl
from distillery.targets import TeacherTargets, sparse_from_logits
from test_cache_support import BlockDataset, TinyTeacher, collate

V, T, K, M = 512, 16, 8, 8
INFO = {"teacher": {"name": "tiny", "weights_hash": "w0"}, "tokenizer_hash": "tok0"}


def _write(out, ds, **kw):
    model = TinyTeacher(V).eval()
    args = dict(k=K, loss_temperature=1.0, manifest_info=INFO, shard_blocks=3, batch_size=2, progress=False,
                tail_samples=M, tail_seed=7)
    args.update(kw)
    return model, write_cache(lambda b: model(b["input_ids"]), ds, out, **args)


def _digest(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_round_trip_and_manifest(tmp_path):
    ds = BlockDataset(8, T, V, seed=1)
    model, s = _write(tmp_path / "c", ds)
    assert s["complete"]
    man = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert man["k"] == K and man["k_top"] == K and man["format_version"] == 2
    assert man["tail"] == {"scheme": "sampled", "m": M, "seed": 7, "sampler": SAMPLER}
    reader = CacheReader(tmp_path / "c")
    assert reader.m == M
    order = torch.tensor([7, 0, 4])
    got = reader.targets(order)
    batch = collate(ds, order)
    with torch.no_grad():
        ref = sparse_from_logits(model(batch["input_ids"]), K, 1.0, tail_samples=M,
                                 uniforms=tail_uniforms(7, order, T, M))
    mask = batch["labels"] != -100
    assert got.n_samples == M and torch.equal(got.mask, mask)
    assert torch.equal(got.topk_ids[mask], ref.topk_ids[mask]) and torch.equal(got.sample_ids[mask], ref.sample_ids[mask])
    bound = torch.from_numpy(reader.encoding.max_logprob_error(ref.sample_logprobs.numpy())).float()
    assert ((got.sample_logprobs - ref.sample_logprobs).abs() <= bound)[mask].all()
    assert (got.sample_ids[~mask] == 0).all()  # masked positions hold zeros
    for row in zip(got.topk_ids[mask].tolist(), got.sample_ids[mask].tolist()):
        assert not set(row[0]) & set(row[1])  # draws come from the tail only
    table = pa.ipc.open_stream(pa.memory_map(str(tmp_path / "c" / "train" / "00000.arrow"))).read_all()
    assert table.column_names == ["index", "digest", "mask", "ids", "logprobs", "tail", "sample_ids", "sample_logprobs"]
    assert table.schema.field("sample_ids").type == pa.list_(pa.list_(pa.uint16(), M), T)
    assert json.loads(table.schema.metadata[b"distillery"])["tail"]["m"] == M
    assert reader.encoding.bytes_per_position(K, M) == 50
    text = cache_info(tmp_path / "c")
    assert f"{M} ids drawn from the tail" in text and "50 payload bytes/position" in text


def test_draws_are_deterministic_across_runs_ranks_and_resume(tmp_path):
    """Same seed: byte-identical shards, commit records and manifest, whether written in one go, by two
    ranks, or resumed after losing shards; another seed changes the draws and nothing else."""
    ds = {"train": BlockDataset(10, T, V, seed=2), "val": BlockDataset(4, T, V, seed=3)}
    _write(tmp_path / "one", ds)
    for rank in (1, 0):
        _write(tmp_path / "two", ds, rank=rank, world_size=2)
    assert _digest(tmp_path / "one") == _digest(tmp_path / "two")
    shutil.copytree(tmp_path / "one", tmp_path / "resumed")
    for name in ("train/00001.arrow", "train/00001.commit.json", "val/00000.commit.json"):
        (tmp_path / "resumed" / name).unlink()
    _, s = _write(tmp_path / "resumed", ds)
    assert s["shards_written"] == 2 and _digest(tmp_path / "one") == _digest(tmp_path / "resumed")
    _write(tmp_path / "seed8", ds, tail_seed=8)
    a, b = CacheReader(tmp_path / "one").targets([3, 4]), CacheReader(tmp_path / "seed8").targets([3, 4])
    assert torch.equal(a.topk_ids, b.topk_ids) and not torch.equal(a.sample_ids, b.sample_ids)
    with pytest.raises(DistilleryError, match="tail.m = 8, this run has 4"):
        _write(tmp_path / "one", ds, tail_samples=4)


def test_uniforms_follow_the_documented_hash():
    """Another tool recomputes the draws' uniforms from cache/sampling.py's formula (plain Python ints here)."""
    mask64 = (1 << 64) - 1

    def mix(x):
        x = (x + 0x9E3779B97F4A7C15) & mask64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask64
        return x ^ (x >> 31)

    u = tail_uniforms(7, torch.tensor([0, 123456]), 5, 3)
    assert u.shape == (2, 5, 3) and u.dtype == torch.float64 and ((u >= 0) & (u < 1)).all()
    for b, index in enumerate((0, 123456)):
        key = mix(mix(7) ^ index)
        for t in range(5):
            for j in range(3):
                assert u[b, t, j].item() == (mix(key ^ (t << 32 | j)) >> 11) * 2.0 ** -53
    assert not torch.equal(u, tail_uniforms(8, torch.tensor([0, 123456]), 5, 3))


def test_old_format_cache_loads_and_resumes(tmp_path):
    """A cache written before sampled tails (format 1: no 'tail'/'k_top' keys, six columns) still reads and resumes."""
    ds = BlockDataset(6, T, V, seed=4)
    model, _ = _write(tmp_path / "old", ds, tail_samples=0)
    for name in ("header.json", "manifest.json"):
        path = tmp_path / "old" / name
        d = json.loads(path.read_text())
        assert d["tail"] == {"scheme": "bucket", "m": 0} and d["format_version"] == 1
        del d["tail"], d["k_top"]
        path.write_text(json.dumps(d, indent=1, sort_keys=True) + "\n")
    reader = CacheReader(tmp_path / "old")
    assert reader.m == 0 and reader.tail["scheme"] == "bucket"
    teacher = CachedTeacher(tmp_path / "old")
    batch = collate(ds, [5, 1])
    t = teacher.targets(batch)
    assert t.n_samples == 0 and t.width == K
    assert torch.isfinite(forward_kl(TinyTeacher(V, seed=5)(batch["input_ids"]), t)).all()
    assert "one bucket" in cache_info(tmp_path / "old")
    _, s = _write(tmp_path / "old", ds, tail_samples=0)  # rerun with the same settings: nothing to do
    assert s["shards_written"] == 0 and s["complete"]


def test_bucket_option_and_loss_from_cache(tmp_path):
    """Forward KL from the sampled cache is close to live on average; tail='bucket' gives the biased bucket
    value; reverse KL ignores the draws either way."""
    ds = BlockDataset(40, T, V, seed=6)
    model, _ = _write(tmp_path / "c", ds, shard_blocks=40, batch_size=8)
    idx = torch.arange(40)
    batch = collate(ds, idx)
    sampled = CachedTeacher(tmp_path / "c").targets(batch)
    bucket = CachedTeacher(tmp_path / "c", tail="bucket").targets(batch)
    assert sampled.n_samples == M and bucket.n_samples == 0
    assert CachedTeacher(tmp_path / "c", tail="bucket").eval_teacher() is None  # no val split cached
    student = TinyTeacher(V, seed=9, scale=2.0)(batch["input_ids"]).detach()
    with torch.no_grad():
        live_logits = model(batch["input_ids"])
    m = sampled.mask
    live = forward_kl(student, live_logits)[m].mean().item()
    est = forward_kl(student, sampled)[m].mean().item()
    low = forward_kl(student, bucket)[m].mean().item()
    assert abs(est - live) < 0.02 * live and low < 0.8 * live  # measured: +0.5% vs -44%
    assert torch.equal(reverse_kl(student, sampled), reverse_kl(student, bucket))
    with pytest.raises(DistilleryError, match="tail must be"):
        CachedTeacher(tmp_path / "c", tail="sampled")


def test_sampled_tail_needs_a_dense_teacher_and_a_tail(tmp_path):
    ds = BlockDataset(4, T, V, seed=7)
    model = TinyTeacher(V).eval()

    def sparse_teacher(batch):
        return sparse_from_logits(model(batch["input_ids"]), 16, 1.0)

    with pytest.raises(DistilleryError, match="needs the teacher's full distribution"):
        write_cache(sparse_teacher, ds, tmp_path / "a", k=K, loss_temperature=1.0, manifest_info=INFO,
                    tail_samples=M, vocab_size=V, progress=False)

    def sampled_teacher(batch):  # already carries exactly k top entries and M draws: passed through
        return sparse_from_logits(model(batch["input_ids"]), K, 1.0, tail_samples=M,
                                  uniforms=tail_uniforms(0, batch["index"], T, M))

    write_cache(sampled_teacher, ds, tmp_path / "b", k=K, loss_temperature=1.0, manifest_info=INFO, shard_blocks=2,
                batch_size=2, tail_samples=M, vocab_size=V, progress=False)  # a sparse teacher: say V
    write_cache(lambda b: model(b["input_ids"]), ds, tmp_path / "c", k=K, loss_temperature=1.0, manifest_info=INFO,
                shard_blocks=2, batch_size=2, tail_samples=M, progress=False)
    assert _digest(tmp_path / "b") == _digest(tmp_path / "c")
    _, s = _write(tmp_path / "full", ds, k=V)  # k = V: no tail to draw from
    man = json.loads((tmp_path / "full" / "manifest.json").read_text())
    assert man["tail"] == {"scheme": "bucket", "m": 0} and CacheReader(tmp_path / "full").targets([0]).n_samples == 0


def test_cli_defaults_follow_the_loss():
    def cfg(kd, beta=0.5, alpha=0.1):
        return SimpleNamespace(loss=SimpleNamespace(kd=kd, beta=beta, alpha=alpha))

    assert default_k_and_samples(cfg("forward_kl"), None, None) == (16, 16)
    assert default_k_and_samples(cfg("jsd", beta=0.0), None, None) == (16, 16)
    assert default_k_and_samples(cfg("reverse_kl"), None, None) == (32, 0)
    assert default_k_and_samples(cfg("jsd"), None, None) == (32, 0)
    assert default_k_and_samples(cfg("forward_kl"), 24, 8) == (24, 8)
    assert default_k_and_samples(cfg("forward_kl"), None, 0) == (32, 0)
    assert default_k_and_samples(cfg("forward_kl"), 8, None) == (8, 16)


def test_targets_dataclass_keeps_samples_through_to():
    t = TeacherTargets(topk_ids=torch.zeros(1, 2, 3, dtype=torch.long), topk_logprobs=torch.zeros(1, 2, 3),
                       tail_logprob=torch.zeros(1, 2), sample_ids=torch.ones(1, 2, 4, dtype=torch.long),
                       sample_logprobs=torch.zeros(1, 2, 4), loss_temperature=1.0)
    assert t.to("cpu").n_samples == 4
