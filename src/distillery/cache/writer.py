"""Write a teacher cache: run the teacher once over the data, store sparse top-k targets in shards.

Work is split into shards of ``shard_blocks`` consecutive blocks per split; shard ``n`` of every
split belongs to rank ``n % world_size``, so ``N`` processes (``accelerate launch --num_processes N``)
write disjoint shards of one folder without talking to each other. Batches never straddle shards,
so a shard's bytes depend only on its blocks, the teacher and ``batch_size``: with a deterministic
teacher, a resumed, a multi-process and a one-process run produce byte-identical shards.

With a sampled tail (``tail_samples = m > 0``) each position also gets ``m`` draws from the teacher's
tail distribution; their uniforms are a hash of ``(tail_seed, block index, position, draw)``
(:mod:`.sampling`), so the draws, like everything else in a shard, do not depend on rank, resume
point or shard order.

Resuming is per shard: committed shards (commit record present, size and sha256 match) are skipped;
a shard that was being written when the process died is written again from its first block.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..errors import DistilleryError
from ..locks import mkdtemp_plain, refuse_foreign
from . import layout
from .codec import Encoding, to_sparse
from .sampling import tail_record, tail_uniforms
from .shard import ShardArrays, block_digest, serialize, shard_schema

RESERVED = {"format", "format_version", "k", "k_top", "tail", "loss_temperature", "vocab_size", "seq_len", "encoding",
            "shard_blocks", "splits", "shards", "committed_shards", "expected_shards", "complete"}


def _as_splits(datasets: Any) -> dict[str, Any]:
    """A dataset, a ``{split: dataset}`` mapping, or an object with ``.train``/``.val`` -> mapping."""
    if isinstance(datasets, Mapping):
        splits = dict(datasets)
    elif hasattr(datasets, "train") and hasattr(datasets, "val"):
        splits = {"train": datasets.train}
        if getattr(datasets, "val", None) is not None and len(datasets.val):
            splits["val"] = datasets.val
    else:
        splits = {"train": datasets}
    for name in splits:
        layout.check_split_name(name)
    return splits


def _collate(items: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([torch.as_tensor(it[key]) for it in items]) for key in items[0]}


def _normalise(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True))


def _header(*, manifest_info: dict, k: int, loss_temperature: float, vocab_size: int, seq_len: int,
            enc: Encoding, shard_blocks: int, splits: dict[str, Any], tail: dict) -> dict:
    clash = RESERVED & set(manifest_info)
    if clash:
        raise DistilleryError(f"manifest_info may not set the cache's own keys: {', '.join(sorted(clash))}")
    header = dict(manifest_info)
    header.update(format=layout.FORMAT, format_version=layout.FORMAT_VERSION_SAMPLED if tail["m"] else
                  layout.FORMAT_VERSION, k=k, k_top=k, tail=tail, loss_temperature=float(loss_temperature), vocab_size=vocab_size, seq_len=seq_len,
                  encoding=enc.to_json(), shard_blocks=shard_blocks,
                  splits={name: {"blocks": len(ds), "shards": math.ceil(len(ds) / shard_blocks)}
                          for name, ds in splits.items()})
    return _normalise(header)


def _open_header(root: Path, header: dict) -> None:
    """Create ``header.json``, or check that the one already there describes the same cache."""
    with layout.locked(root):
        path = root / "header.json"
        if not path.is_file():
            refuse_foreign(root, ("header.json",), "cache folder", "a teacher cache's")  # e.g. --out ~/notes
            layout.write_json(path, header)
            return
        have = layout.read_json(path)
        if "tail" not in have and header["tail"]["m"] == 0:  # written before sampled tails: same layout
            header = {key: v for key, v in header.items() if key not in ("tail", "k_top")}
        diff = layout.first_difference(have, header)
    if diff:
        where, have, want = diff
        raise DistilleryError(f"{root} already holds a teacher cache with {where} = {have!r}, this run has "
                              f"{want!r}: choose another output folder, or delete it to start over")


def _save_tokenizer(root: Path, tokenizer: Any) -> None:
    if (root / "tokenizer").is_dir():
        return
    tmp = mkdtemp_plain("tokenizer.tmp-", root)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, root / "tokenizer")
    except OSError:  # another rank got there first
        shutil.rmtree(tmp, ignore_errors=True)


@torch.no_grad()
def _write_shard(teacher_fn: Callable, ds: Any, split: str, shard: int, root: Path, *, k: int,
                 loss_temperature: float, vocab_size: int, seq_len: int, enc: Encoding, shard_blocks: int,
                 batch_size: int, bar: Any, tail: dict) -> dict:
    start, stop = shard * shard_blocks, min((shard + 1) * shard_blocks, len(ds))
    m = tail["m"]
    arrays = ShardArrays.empty(stop - start, seq_len, k, enc, m)
    for b0 in range(start, stop, batch_size):
        items = list(range(b0, min(b0 + batch_size, stop)))
        # distillery.data's BlockDataset gathers a batch in one step; other datasets item by item
        batch = ds.batch(items) if hasattr(ds, "batch") else _collate([ds[i] for i in items])
        ids_in = batch["input_ids"]
        if ids_in.ndim != 2 or ids_in.shape[1] != seq_len:
            raise DistilleryError(f"block {b0} of split '{split}' has {tuple(ids_in.shape[1:])} tokens, "
                                  f"the cache's seq_len is {seq_len} (all blocks must have the same length)")
        labels = batch.get("labels")
        if labels is not None:
            mask = (labels != -100).numpy()
        elif "attention_mask" in batch:
            mask = batch["attention_mask"].bool().numpy()
        else:
            mask = np.ones(ids_in.shape, bool)
        index = batch["index"].numpy().astype(np.int64) if "index" in batch else np.arange(b0, b0 + len(items))
        uniforms = tail_uniforms(tail["seed"], index, seq_len, m) if m else None  # (B, T, M)
        top_ids, top_lp, tail_lp, s_ids, s_lp = to_sparse(teacher_fn(batch), k, loss_temperature, vocab_size,
                                                          tail_samples=m, uniforms=uniforms, rows=mask)  # (B,T,K) (B,T,K) (B,T) (B,T,M)x2
        if top_ids.shape != (len(items), seq_len, k):
            raise DistilleryError(f"the teacher returned targets of shape {tuple(top_ids.shape)}, expected "
                                  f"{(len(items), seq_len, k)} (is k larger than the vocabulary?)")
        lp, tl = top_lp.numpy(), tail_lp.numpy()
        finite = np.isfinite(lp).all(-1) & ~np.isnan(tl)
        if m:
            finite &= np.isfinite(s_lp.numpy()).all(-1)
        bad = mask & ~finite
        if bad.any():
            row = int(np.nonzero(bad.any(-1))[0][0])
            raise DistilleryError(f"the teacher produced non-finite log-probs for block {int(index[row])} of split '{split}'")
        m3 = mask[..., None]
        rows = slice(b0 - start, b0 - start + len(items))
        arrays.index[rows] = index
        arrays.digest[rows] = block_digest(ids_in.numpy())
        arrays.mask[rows] = mask
        arrays.ids[rows] = np.where(m3, top_ids.numpy(), 0).astype(enc.id_dtype)
        arrays.codes[rows] = np.where(m3, enc.encode_logprobs(lp), np.zeros((), enc.logprob_dtype))
        arrays.tail[rows] = np.where(mask, enc.encode_tail(tl), np.float16(0))
        if m:
            arrays.sample_ids[rows] = np.where(m3, s_ids.numpy(), 0).astype(enc.id_dtype)
            arrays.sample_codes[rows] = np.where(m3, enc.encode_logprobs(s_lp.numpy()), np.zeros((), enc.logprob_dtype))
        bar.update(len(items) * seq_len)
    meta = {"split": split, "shard": shard, "k": k, "seq_len": seq_len, "loss_temperature": loss_temperature,
            "encoding": enc.to_json()}
    if m:
        meta["tail"] = tail
    buf = serialize(arrays, shard_schema(seq_len, k, enc, meta, m))
    sp = layout.shard_path(root, split, shard)
    layout.atomic_write(sp, memoryview(buf))
    record = {"split": split, "shard": shard, "file": f"{split}/{sp.name}", "rows": stop - start,
              "bytes": buf.size, "sha256": hashlib.sha256(memoryview(buf)).hexdigest(),
              "first_index": int(arrays.index[0]), "last_index": int(arrays.index[-1]),
              "tokens": (stop - start) * seq_len, "target_tokens": int(arrays.mask.sum())}
    if not np.array_equal(arrays.index, np.arange(arrays.index[0], arrays.index[0] + len(arrays.index))):
        record["indices"] = arrays.index.tolist()
    layout.write_json(layout.commit_path(root, split, shard), record)
    return record


def write_cache(teacher_fn: Callable[[dict], Any], datasets: Any, out_dir: str | Path, *, k: int,
                loss_temperature: float, manifest_info: dict, shard_blocks: int = 256, rank: int = 0,
                world_size: int = 1, batch_size: int = 8, vocab_size: int | None = None,
                logprob_encoding: str = "sqrt_u8", logprob_range: float = 32.0, tokenizer: Any = None,
                progress: bool = True, tail_samples: int = 0, tail_seed: int = 0) -> dict:
    """Run ``teacher_fn`` over every block this rank owns and commit the cache shards; return a summary.

    Args:
        teacher_fn: ``batch -> logits (B, T, V)`` or ``TeacherTargets`` (dense, lazy dense or sparse at
            ``loss_temperature`` with at least ``k`` entries). Called under ``torch.no_grad()``.
        datasets: a map-style dataset (``len``, ``ds[i]`` -> dict with ``input_ids (T,)``, ``labels (T,)``
            already shifted, optional ``attention_mask``, ``index``), a ``{split: dataset}`` mapping, or
            an object with ``.train`` / ``.val`` (``DataSplits``).
        out_dir: the cache folder (created; an existing cache there must have the same header).
        k: top-k entries kept per position (capped at the vocabulary size): ``k_top``.
        tail_samples: ``m``, draws per position from the teacher's tail distribution (0 = the top-k and one
            tail bucket only). Forward KL from the cache is then unbiased (:mod:`distillery.losses.sparse`).
            Needs a dense (or lazy dense) teacher. None are drawn when ``k`` covers the vocabulary.
        tail_seed: the seed of the draws (recorded in the manifest).
        loss_temperature: log-probs are ``log_softmax(logits / loss_temperature)``.
        manifest_info: recorded in the manifest as given: ``teacher`` (name, weights_hash),
            ``tokenizer_hash``, ``data_fingerprint``, ... (what :meth:`CacheReader.check` compares).
        shard_blocks: blocks per shard (the unit of commit, resume and rank assignment).
        rank, world_size: this process's share: shards ``n`` with ``n % world_size == rank``.
        batch_size: blocks per teacher call. Shards are byte-identical across runs only for equal
            batch sizes (the teacher's float results may depend on it).
        vocab_size: real vocabulary entries (logits beyond are padding); None = the logits' width.
        logprob_encoding, logprob_range: see :mod:`distillery.cache.codec`.
        tokenizer: saved to ``out_dir/tokenizer`` so a run can train from the cache alone.
        progress: show a progress bar with ETA (tokens).

    Returns a dict: ``tokens_written``, ``tokens_skipped`` (already committed), ``seconds``,
    ``write_tok_per_s``, ``shards_written``, ``complete`` (all ranks done), ``bytes_per_token``.
    """
    from tqdm.auto import tqdm

    root = Path(out_dir)
    if not 0 <= rank < world_size:
        raise DistilleryError(f"cache writer rank {rank} is outside 0..{world_size - 1}")
    if k < 1 or shard_blocks < 1 or batch_size < 1:
        raise DistilleryError("cache k, shard_blocks and batch_size must be >= 1")
    if tail_samples < 0 or not 0 <= tail_seed < 2 ** 63:
        raise DistilleryError(f"cache tail_samples must be >= 0 and tail_seed in [0, 2**63) (got {tail_samples}, {tail_seed})")
    splits = {name: ds for name, ds in _as_splits(datasets).items() if len(ds)}
    if not splits:
        raise DistilleryError("nothing to cache: every dataset split is empty")
    first = next(iter(splits.values()))[0]
    seq_len = len(first["input_ids"])
    root.mkdir(parents=True, exist_ok=True)
    if vocab_size is None:
        if (root / "header.json").is_file():
            vocab_size = int(layout.read_json(root / "header.json")["vocab_size"])
        else:  # one block through the teacher to learn its width
            with torch.no_grad():
                out = teacher_fn(_collate([first]))
            vocab_size = int(out.shape[-1] if isinstance(out, torch.Tensor) else out.width)
    k = min(k, vocab_size)
    tail = tail_record(tail_samples if k < vocab_size else 0, tail_seed)  # nothing to draw from when k = V
    enc = Encoding.choose(vocab_size, logprob_encoding, logprob_range)
    header = _header(manifest_info=manifest_info, k=k, loss_temperature=loss_temperature, vocab_size=vocab_size,
                     seq_len=seq_len, enc=enc, shard_blocks=shard_blocks, splits=splits, tail=tail)
    _open_header(root, header)
    if tokenizer is not None:
        _save_tokenizer(root, tokenizer)

    todo, skipped = [], 0
    for name, ds in splits.items():
        mine = [n for n in range(header["splits"][name]["shards"]) if n % world_size == rank]
        layout.remove_stale_temps(root / name, {layout.shard_path(root, name, n).name for n in mine}
                                  | {layout.commit_path(root, name, n).name for n in mine})
        for n in mine:
            if layout.valid_commit(root, name, n, verify_sha=True):
                skipped += (min((n + 1) * shard_blocks, len(ds)) - n * shard_blocks) * seq_len
            else:
                todo.append((name, n))
    total = skipped + sum((min((n + 1) * shard_blocks, len(splits[s])) - n * shard_blocks) * seq_len for s, n in todo)
    bar = tqdm(total=total, initial=skipped, unit="tok", unit_scale=True, disable=not progress,
               desc=f"cache rank {rank}/{world_size}" if world_size > 1 else "cache")
    t0 = time.perf_counter()
    written = []
    try:
        for name, n in todo:
            written.append(_write_shard(teacher_fn, splits[name], name, n, root, k=k, loss_temperature=loss_temperature,
                                        vocab_size=vocab_size, seq_len=seq_len, enc=enc, shard_blocks=shard_blocks,
                                        batch_size=batch_size, bar=bar, tail=tail))
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    manifest = layout.merge_manifest(root)
    tokens = sum(r["tokens"] for r in written)
    all_tokens = sum(r["tokens"] for r in manifest["shards"])
    return {"out_dir": str(root), "rank": rank, "world_size": world_size, "shards_written": len(written),
            "tokens_written": tokens, "tokens_skipped": skipped, "seconds": round(seconds, 3),
            "write_tok_per_s": round(tokens / seconds, 1) if seconds > 0 and tokens else None,
            "complete": manifest["complete"], "committed_shards": manifest["committed_shards"],
            "expected_shards": manifest["expected_shards"],
            "bytes_per_token": round(sum(r["bytes"] for r in manifest["shards"]) / all_tokens, 2) if all_tokens else None}
