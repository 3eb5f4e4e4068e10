"""One shard: an Arrow IPC *stream* file holding one record batch, one row per block.

Columns (``T`` = seq_len, ``K`` = k; all fixed-size lists, no nulls)::

    index     int64                                    the block's stable number in its split
    digest    uint64                                   blake2b-64 of the block's input_ids (int64 LE bytes)
    mask      fixed_size_list<bool>[T]                 True where labels != -100 (a target position)
    ids       fixed_size_list<fixed_size_list<uint16|uint32>[K]>[T]   top-K token ids, best first
    logprobs  fixed_size_list<fixed_size_list<uint8|uint16|float16>[K]>[T]   encoded log-probs
    tail      fixed_size_list<float16>[T]              log of the mass outside the top-K

and, only in a cache with a sampled tail of ``M`` draws per position (``M`` = the manifest's
``tail.m``; see :mod:`.sampling`)::

    sample_ids       fixed_size_list<fixed_size_list<uint16|uint32>[M]>[T]   ids drawn from the tail, stratum order
    sample_logprobs  fixed_size_list<fixed_size_list<uint8|uint16|float16>[M]>[T]   their encoded log-probs

Positions where ``mask`` is False hold zero bytes in every per-position column. The schema
metadata key ``distillery`` holds JSON with split, shard, k, seq_len, loss_temperature, encoding
(and ``tail`` when there is a sampled tail).
The stream format (not the IPC *file* format) is what ``datasets`` opens (``Dataset.from_file``,
``load_dataset("arrow", ...)``); ``pyarrow.ipc.open_stream`` reads it zero-copy from a memory map.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import DistilleryError
from .codec import Encoding

# pyarrow is imported inside the functions that use it, so a run that reads or writes no cache never loads its
# native libraries (tens of MB resident in every training process otherwise). Column types are pyarrow's by name.
if TYPE_CHECKING:
    import pyarrow as pa


def block_digest(input_ids: np.ndarray) -> np.ndarray:
    """``(B, T)`` token ids -> ``(B,)`` uint64: blake2b (8-byte digest) of each row as int64 little-endian."""
    rows = np.ascontiguousarray(input_ids, dtype="<i8")
    return np.array([int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest(), "little")
                     for r in rows], dtype=np.uint64)


COLUMNS = ["index", "digest", "mask", "ids", "logprobs", "tail"]
SAMPLE_COLUMNS = ["sample_ids", "sample_logprobs"]


def shard_schema(seq_len: int, k: int, enc: Encoding, meta: dict, m: int = 0) -> pa.Schema:
    import pyarrow as pa
    fields = [
        ("index", pa.int64()),
        ("digest", pa.uint64()),
        ("mask", pa.list_(pa.bool_(), seq_len)),
        ("ids", pa.list_(pa.list_(getattr(pa, enc.ids)(), k), seq_len)),
        ("logprobs", pa.list_(pa.list_(getattr(pa, enc.logprob_dtype.name)(), k), seq_len)),
        ("tail", pa.list_(pa.float16(), seq_len)),
    ]
    if m:
        fields += [("sample_ids", pa.list_(pa.list_(getattr(pa, enc.ids)(), m), seq_len)),
                   ("sample_logprobs", pa.list_(pa.list_(getattr(pa, enc.logprob_dtype.name)(), m), seq_len))]
    return pa.schema(fields, metadata={"distillery": json.dumps(meta, sort_keys=True)})


@dataclass
class ShardArrays:
    """The decoded-layout numpy arrays of one shard (``n`` rows)."""

    index: np.ndarray     # (n,) int64
    digest: np.ndarray    # (n,) uint64
    mask: np.ndarray      # (n, T) bool
    ids: np.ndarray       # (n, T, K) uint16|uint32
    codes: np.ndarray     # (n, T, K) uint8|uint16|float16
    tail: np.ndarray      # (n, T) float16
    sample_ids: np.ndarray | None = None    # (n, T, M) uint16|uint32: the sampled tail, or None
    sample_codes: np.ndarray | None = None  # (n, T, M) encoded log-probs of the draws

    @staticmethod
    def empty(n: int, seq_len: int, k: int, enc: Encoding, m: int = 0) -> "ShardArrays":
        return ShardArrays(index=np.zeros(n, np.int64), digest=np.zeros(n, np.uint64),
                           mask=np.zeros((n, seq_len), bool), ids=np.zeros((n, seq_len, k), enc.id_dtype),
                           codes=np.zeros((n, seq_len, k), enc.logprob_dtype), tail=np.zeros((n, seq_len), np.float16),
                           sample_ids=np.zeros((n, seq_len, m), enc.id_dtype) if m else None,
                           sample_codes=np.zeros((n, seq_len, m), enc.logprob_dtype) if m else None)


def _fixed(values: np.ndarray, *sizes: int) -> pa.Array:
    import pyarrow as pa
    arr = pa.array(values.reshape(-1))
    for size in reversed(sizes):
        arr = pa.FixedSizeListArray.from_arrays(arr, size)
    return arr


def serialize(a: ShardArrays, schema: pa.Schema) -> pa.Buffer:
    """The shard's bytes (Arrow IPC stream, uncompressed, one record batch)."""
    import pyarrow as pa
    n, t, k = a.ids.shape
    cols = [pa.array(a.index), pa.array(a.digest), _fixed(a.mask, t), _fixed(a.ids, t, k), _fixed(a.codes, t, k),
            _fixed(a.tail, t)]
    if a.sample_ids is not None:
        m = a.sample_ids.shape[-1]
        cols += [_fixed(a.sample_ids, t, m), _fixed(a.sample_codes, t, m)]
    batch = pa.record_batch(cols, schema=schema)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue()


def _values(col: pa.Array, depth: int) -> pa.Array:
    for _ in range(depth):
        col = col.flatten()
    return col


def load(path: Path, seq_len: int, k: int, enc: Encoding, m: int = 0) -> ShardArrays:
    """Memory-map a shard and return numpy views on it (zero-copy except the bit-packed mask).

    ``m`` = draws per position of the sampled tail (0: a cache without one, the six-column layout)."""
    import pyarrow as pa
    try:
        reader = pa.ipc.open_stream(pa.memory_map(str(path), "r"))
        batches = list(reader)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DistilleryError(f"cache shard {path} is corrupt or truncated ({str(exc).splitlines()[0]})") from None
    if len(batches) != 1:
        raise DistilleryError(f"cache shard {path} holds {len(batches)} record batches, expected 1 (corrupt)")
    b = batches[0]
    want = COLUMNS + (SAMPLE_COLUMNS if m else [])
    if b.schema.names != want:
        raise DistilleryError(f"cache shard {path} has columns {b.schema.names}, expected {want}")
    n = b.num_rows
    try:
        return ShardArrays(
            index=b.column("index").to_numpy(),
            digest=b.column("digest").to_numpy(),
            mask=_values(b.column("mask"), 1).to_numpy(zero_copy_only=False).reshape(n, seq_len),
            ids=_values(b.column("ids"), 2).to_numpy().reshape(n, seq_len, k).astype(enc.id_dtype, copy=False),
            codes=_values(b.column("logprobs"), 2).to_numpy().reshape(n, seq_len, k),
            tail=_values(b.column("tail"), 1).to_numpy().reshape(n, seq_len),
            sample_ids=None if not m else
            _values(b.column("sample_ids"), 2).to_numpy().reshape(n, seq_len, m).astype(enc.id_dtype, copy=False),
            sample_codes=None if not m else _values(b.column("sample_logprobs"), 2).to_numpy().reshape(n, seq_len, m),
        )
    except (ValueError, pa.ArrowInvalid) as exc:
        raise DistilleryError(f"cache shard {path} does not have the shape of this cache "
                              f"(seq_len={seq_len}, k={k}, m={m}): {exc}") from None
