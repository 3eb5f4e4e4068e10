"""``distillery cache --info DIR``: what a cache holds, how big it is, how far writing got."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DistilleryError
from . import layout
from .codec import Encoding
from .sampling import read_tail_record


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def cache_info(path: str | Path, verify: bool = False) -> str:
    """A readable summary of the cache at ``path`` (finished or still being written).

    With ``verify=True`` every committed shard's sha256 is checked too (raises on the first bad one).
    """
    root = Path(path)
    if not (root / "header.json").is_file():
        raise DistilleryError(f"{root} is not a teacher cache (no header.json)")
    header = layout.read_json(root / "header.json")
    recs = [r for split, info in header["splits"].items() for n in range(info["shards"])
            if (r := layout.valid_commit(root, split, n)) is not None]
    expected = sum(info["shards"] for info in header["splits"].values())
    if verify:
        from .reader import CacheReader

        CacheReader(root, verify="full")
    enc = Encoding.from_json(header["encoding"])
    tail = read_tail_record(header)
    shard_bytes = sum(r["bytes"] for r in recs)
    tokens = sum(r["tokens"] for r in recs)
    targets = sum(r["target_tokens"] for r in recs)
    teacher = header.get("teacher", {})
    lines = [
        f"teacher cache {root}",
        f"  status:       {'complete' if len(recs) == expected else 'INCOMPLETE'} ({len(recs)}/{expected} shards committed)"
        + ("; sha256 verified" if verify else ""),
        f"  teacher:      {teacher.get('name', '?')} (weights sha256 {str(teacher.get('weights_hash', '?'))[:16]})",
        f"  tokenizer:    hash {str(header.get('tokenizer_hash', '?'))[:16]}"
        + (" (saved in tokenizer/)" if (root / "tokenizer").is_dir() else ""),
        f"  targets:      top-{header['k']} of {header['vocab_size']} at loss_temperature {header['loss_temperature']}, "
        f"seq_len {header['seq_len']}",
        f"  tail:         " + (f"one bucket (log of the mass outside the top-{header['k']})" if not tail["m"] else
                               f"tail mass + {tail['m']} ids drawn from the tail per position ({tail.get('sampler')}, seed {tail.get('seed')})"),
        f"  encoding:     ids {enc.ids}, log-probs {enc.logprobs}"
        + (f" (range {enc.logprob_range})" if enc.logprobs != "float16" else "")
        + f", tail {enc.tail}: {enc.bytes_per_position(header['k'], tail['m'])} payload bytes/position",
    ]
    for split, info in header["splits"].items():
        done = [r for r in recs if r["split"] == split]
        lines.append(f"  split {split + ':':<8}{info['blocks']} blocks in {info['shards']} shards of "
                     f"{header['shard_blocks']}; {sum(r['rows'] for r in done)} blocks committed")
    if tokens:
        lines.append(f"  size:         {_size(shard_bytes)} of shards ({_size(_folder_bytes(root))} folder) "
                     f"for {tokens:,} tokens ({targets:,} targets): {shard_bytes / tokens:.1f} bytes/token")
    fp = header.get("data_fingerprint")
    if fp is not None:
        text = json.dumps(fp, sort_keys=True)
        lines.append(f"  data:         {text[:200]}{'...' if len(text) > 200 else ''}")
    return "\n".join(lines)
