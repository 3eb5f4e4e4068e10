"""Read a teacher cache: check it matches a run, and fetch sparse ``TeacherTargets`` by block index.

Shards are memory-mapped on first use and gathered with numpy fancy indexing; log-probs decode
through a lookup table. Integrity: at open every shard's size is compared with the manifest (a
truncated shard is named at once); a shard's sha256 is verified the first time it is used
(``verify="lazy"``, the default), for all shards at open (``"full"``) or never (``"size"``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from ..errors import DistilleryError
from ..hashing import file_sha256
from ..targets import TeacherTargets
from . import layout
from .codec import Encoding
from .sampling import read_tail_record
from .shard import ShardArrays, load

# what check() calls each key in its messages, and the order it checks them in
_NAMES = {"tokenizer_hash": "tokenizer hash", "seq_len": "packing (seq_len)", "k": "k (top-k entries)",
          "loss_temperature": "loss_temperature", "vocab_size": "vocabulary size", "teacher": "teacher",
          "data_fingerprint": "data fingerprint", "tail": "tail scheme (sampled tail)"}


class _SplitIndex:
    """Block index -> (shard position, row) for one split."""

    def __init__(self, recs: list[dict]):
        self.recs = recs
        firsts = np.array([r["first_index"] for r in recs], np.int64)
        lasts = np.array([r["last_index"] for r in recs], np.int64)
        # fast path: every shard holds consecutive indices and the shards are in increasing order
        self.contiguous = all("indices" not in r for r in recs) and bool(np.all(firsts[1:] > lasts[:-1]))
        if self.contiguous:
            self.firsts, self.lasts = firsts, lasts
            return
        idx = np.concatenate([np.asarray(r.get("indices", np.arange(r["first_index"], r["last_index"] + 1)), np.int64)
                              for r in recs])
        pos = np.concatenate([np.full(r["rows"], p, np.int64) for p, r in enumerate(recs)])
        row = np.concatenate([np.arange(r["rows"], dtype=np.int64) for r in recs])
        order = np.argsort(idx, kind="stable")
        self.idx, self.pos, self.row = idx[order], pos[order], row[order]

    def all_indices(self) -> np.ndarray:
        if not self.recs:
            return np.zeros(0, np.int64)
        if self.contiguous:
            return np.concatenate([np.arange(a, b + 1) for a, b in zip(self.firsts, self.lasts)])
        return self.idx

    def locate(self, indices: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
        if not self.recs:
            pos, row, ok = indices, indices, np.zeros(len(indices), bool)
        elif self.contiguous:
            pos = np.clip(np.searchsorted(self.firsts, indices, side="right") - 1, 0, None)
            ok = (indices >= self.firsts[pos]) & (indices <= self.lasts[pos])
            row = indices - self.firsts[pos]
        else:
            at = np.clip(np.searchsorted(self.idx, indices), 0, len(self.idx) - 1)
            ok = self.idx[at] == indices
            pos, row = self.pos[at], self.row[at]
        if not ok.all():
            bad = int(indices[~ok][0])
            raise DistilleryError(f"block index {bad} of split '{split}' is not in the teacher cache")
        return pos, row


def _by_content(fingerprint):
    """A data fingerprint without the data files' paths: a file is known by its size and sha256, so the same bytes
    in another folder (a copy, another demo's output folder) make the same blocks and may use the same cache."""
    if not isinstance(fingerprint, dict):
        return fingerprint
    out = dict(fingerprint)
    for key in ("files", "validation_files"):
        if isinstance(out.get(key), list):
            out[key] = [{k: v for k, v in f.items() if k != "path"} if isinstance(f, dict) else f for f in out[key]]
    return out


class CacheReader:
    """A finished teacher cache folder, opened for reading.

    Attributes: ``manifest`` (dict), ``k`` (top-k entries), ``m`` (sampled-tail draws per position,
    0 for a top-k + tail-bucket cache, including every cache written before sampled tails existed),
    ``tail`` (the manifest's tail record), ``seq_len``, ``loss_temperature``, ``vocab_size``,
    ``encoding`` (:class:`~distillery.cache.codec.Encoding`), ``splits`` (``{name: blocks}``).
    """

    def __init__(self, path: str | Path, verify: str = "lazy", max_open_shards: int = 64):
        if verify not in ("lazy", "full", "size"):
            raise ValueError("verify must be 'lazy', 'full' or 'size'")
        self.root = Path(path)
        self.manifest = _open_manifest(self.root)
        m = self.manifest
        layout.check_manifest(m, self.root / "manifest.json")
        self.k, self.seq_len, self.vocab_size = int(m["k"]), int(m["seq_len"]), int(m["vocab_size"])
        self.loss_temperature = float(m["loss_temperature"])
        self.tail = read_tail_record(m)
        self.m = int(self.tail.get("m", 0))
        self.encoding = Encoding.from_json(m["encoding"])
        self.splits = {name: info["blocks"] for name, info in m["splits"].items()}
        self._table = self.encoding.logprob_table()
        self._verify = verify
        self._verified: set[str] = set()
        self._open: OrderedDict[str, ShardArrays] = OrderedDict()
        self._max_open = max_open_shards
        by_split: dict[str, list[dict]] = {name: [] for name in self.splits}
        for rec in sorted(m["shards"], key=lambda r: (r["split"], r["shard"])):
            path_ = layout.member(self.root, rec["file"])
            size = path_.stat().st_size if path_.is_file() else None
            if size != rec["bytes"]:
                what = "is missing" if size is None else f"has {size} bytes, the manifest says {rec['bytes']} (truncated or replaced)"
                raise DistilleryError(f"cache shard {path_} {what}")
            by_split.setdefault(rec["split"], []).append(rec)
        self._index = {name: _SplitIndex(recs) for name, recs in by_split.items()}
        if verify == "full":
            self.verify()

    # ------------------------------------------------------------------ integrity
    def _check_sha(self, rec: dict) -> None:
        path = self.root / rec["file"]
        if rec["file"] in self._verified:
            return
        if file_sha256(path) != rec["sha256"]:
            raise DistilleryError(f"cache shard {path} is corrupt: its sha256 does not match the manifest")
        self._verified.add(rec["file"])

    def verify(self) -> None:
        """Check every shard's sha256 against the manifest (raises DistilleryError naming the first bad one)."""
        for idx in self._index.values():
            for rec in idx.recs:
                self._check_sha(rec)

    def check(self, expected: dict) -> None:
        """Raise DistilleryError naming the first difference between the cache and ``expected``.

        Keys are manifest keys, e.g. ``tokenizer_hash``, ``seq_len``, ``data_fingerprint`` (compared
        recursively: the message names the differing field), ``k``, ``loss_temperature``, ``teacher``,
        ``vocab_size``. Numbers compare with a relative tolerance of 1e-9.
        """
        import json

        want_all = json.loads(json.dumps(expected))
        for key in sorted(want_all, key=lambda x: (list(_NAMES).index(x) if x in _NAMES else len(_NAMES), x)):
            name = _NAMES.get(key, key)
            if key not in self.manifest:
                raise DistilleryError(f"teacher cache {self.root} does not record its {name} ('{key}'); rewrite the cache")
            have, want = self.manifest[key], want_all[key]
            if key == "data_fingerprint":
                have, want = _by_content(have), _by_content(want)
            diff = layout.first_difference(have, want)
            if diff:
                where, have, want = diff
                at = f" at '{where}'" if where else ""
                raise DistilleryError(f"teacher cache {self.root} was written for another {name}{at}: "
                                      f"cache has {have!r}, this run has {want!r}")

    # ------------------------------------------------------------------ reading
    def _shard(self, split: str, pos: int) -> ShardArrays:
        rec = self._index[split].recs[pos]
        key = rec["file"]
        if key in self._open:
            self._open.move_to_end(key)
            return self._open[key]
        if self._verify == "lazy":
            self._check_sha(rec)
        arrays = load(self.root / key, self.seq_len, self.k, self.encoding, self.m)
        if len(arrays.index) != rec["rows"] or int(arrays.index[0]) != rec["first_index"]:
            raise DistilleryError(f"cache shard {self.root / key} does not hold the rows its commit record names")
        self._open[key] = arrays
        if len(self._open) > self._max_open:
            self._open.popitem(last=False)
        return arrays

    def gather(self, indices, split: str = "train") -> ShardArrays:
        """The stored (still encoded) rows for block ``indices`` ``(B,)`` of ``split``, in that order."""
        if split not in self._index:
            raise DistilleryError(f"teacher cache {self.root} has no split '{split}' (it has {', '.join(self._index)})")
        idx = np.asarray(torch.as_tensor(indices).reshape(-1).cpu().numpy(), np.int64)
        pos, row = self._index[split].locate(idx, split)
        out = ShardArrays.empty(len(idx), self.seq_len, self.k, self.encoding, self.m)
        for p in np.unique(pos):
            sel = pos == p
            a, r = self._shard(split, int(p)), row[sel]
            out.index[sel], out.digest[sel], out.mask[sel] = a.index[r], a.digest[r], a.mask[r]
            out.ids[sel], out.codes[sel], out.tail[sel] = a.ids[r], a.codes[r], a.tail[r]
            if self.m:
                out.sample_ids[sel], out.sample_codes[sel] = a.sample_ids[r], a.sample_codes[r]
        return out

    def decode(self, rows: ShardArrays, samples: bool = True) -> TeacherTargets:
        """Encoded rows -> sparse ``TeacherTargets`` (ids int64 ``(B,T,K)``, log-probs and tail float32;
        with the sampled tail ``(B,T,M)`` if the cache has one and ``samples``, else without it)."""
        lp = self.encoding.decode_logprobs(rows.codes, self._table)
        s_ids = s_lp = None
        if samples and rows.sample_ids is not None:
            s_ids = torch.from_numpy(rows.sample_ids.astype(np.int64))
            s_lp = torch.from_numpy(np.ascontiguousarray(self.encoding.decode_logprobs(rows.sample_codes, self._table),
                                                         np.float32))
        return TeacherTargets(topk_ids=torch.from_numpy(rows.ids.astype(np.int64)), sample_ids=s_ids, sample_logprobs=s_lp,
                              topk_logprobs=torch.from_numpy(np.ascontiguousarray(lp, np.float32)),
                              tail_logprob=torch.from_numpy(self.encoding.decode_tail(rows.tail)),
                              loss_temperature=self.loss_temperature, mask=torch.from_numpy(rows.mask.copy()),
                              vocab_size=self.vocab_size)

    def targets(self, indices, split: str = "train", samples: bool = True) -> TeacherTargets:
        """Sparse teacher targets ``(B, T, K)`` (+ the sampled tail) for block ``indices`` ``(B,)`` of ``split``."""
        return self.decode(self.gather(indices, split), samples)

    def indices(self, split: str = "train") -> np.ndarray:
        """Every block index stored for ``split`` (sorted)."""
        return self._index[split].all_indices()

    def measure_read_throughput(self, split: str = "train", batch_size: int = 8, batches: int = 50,
                                seed: int = 0) -> dict:
        """Time ``targets()`` on random batches: a first pass (cold: sha256 checks, page faults) and a warm one."""
        idx = self.indices(split)
        rng = np.random.default_rng(seed)
        picks = [rng.choice(idx, size=min(batch_size, len(idx)), replace=False) for _ in range(batches)]
        result = {"batch_size": batch_size, "batches": batches, "tokens_per_batch": len(picks[0]) * self.seq_len}
        for label in ("cold", "warm"):
            t0 = time.perf_counter()
            for p in picks:
                self.targets(p, split)
            dt = time.perf_counter() - t0
            result[f"{label}_tok_per_s"] = round(batches * len(picks[0]) * self.seq_len / dt, 1)
        return result


def _open_manifest(root: Path) -> dict:
    mpath, hpath = root / "manifest.json", root / "header.json"
    if not mpath.is_file():
        if hpath.is_file():
            raise DistilleryError(f"teacher cache {root} is incomplete (no manifest.json yet): rerun "
                                  f"`distillery cache` with the same settings to finish it")
        raise DistilleryError(f"{root} is not a teacher cache (no manifest.json)")
    m = layout.read_json(mpath)
    if m.get("format") != layout.FORMAT:
        raise DistilleryError(f"{mpath} is not a distillery teacher cache manifest")
    if m.get("format_version") not in layout.READABLE_VERSIONS:
        raise DistilleryError(f"{mpath} has cache format version {m.get('format_version')}; this distillery reads "
                              f"versions {', '.join(map(str, layout.READABLE_VERSIONS))}")
    if not m.get("complete"):
        raise DistilleryError(f"teacher cache {root} is incomplete: {m.get('committed_shards')} of "
                              f"{m.get('expected_shards')} shards committed; rerun `distillery cache` with the same "
                              f"settings to finish it")
    return m
