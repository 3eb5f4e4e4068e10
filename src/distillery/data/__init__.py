"""Training data: read text / JSONL / chat files, tokenize, pack into blocks, split, load in batches.

Batches are dicts: ``input_ids (B, T)``, ``labels (B, T)`` (already shifted, -100 = no loss),
``attention_mask (B, T)``, ``index (B,)`` (the block's number in its split), all int64.

* ``readers``: files/folders/``demo:`` corpora -> ``Record``s (``read_records``)
* ``tokenize`` / ``chat``: text -> one token stream; conversations -> ids + assistant mask
* ``pack``: ``BlockDataset`` (blocks of ``seq_len + 1`` tokens over one flat tensor), ``collate``
* ``split``: machine-independent seeded permutations, train/validation split
* ``loader``: ``make_loader`` (deterministic, resumable, sharded over ranks; ``block_weights``: ``data.weights``)
* ``build``: ``build_datasets`` -> ``DataSplits(train, val, fingerprint)``, ``tokenizer_hash``
"""

from .build import DataSplits, build_datasets, tokenizer_hash
from .loader import BlockLoader, BlockSampler, block_weights, make_loader
from .pack import BlockDataset, collate
from .readers import DEMO_CORPORA, Record, read_records, resolve_sources
from .split import permutation

__all__ = ["DataSplits", "build_datasets", "tokenizer_hash", "BlockLoader", "BlockSampler", "block_weights", "make_loader",
           "BlockDataset", "collate", "DEMO_CORPORA", "Record", "read_records", "resolve_sources", "permutation"]
