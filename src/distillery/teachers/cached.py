"""``CachedTeacher``: a teacher cache behind the same ``targets(batch)`` method as a live teacher.

It reads the block numbers in ``batch["index"]``, checks that the batch's tokens are the ones the
cache was written for (per-block digest) and that every target position of the batch has a stored
target, and returns sparse :class:`~distillery.targets.TeacherTargets` (with the sampled tail when
the cache has one and ``tail="auto"``; ``tail="bucket"`` drops it, so even forward KL uses the tail bucket).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DistilleryError
from ..targets import TeacherTargets
from ..cache.reader import CacheReader
from ..cache.shard import block_digest


class CachedTeacher:
    """Teacher targets from a cache folder (``split`` = which cached split ``batch["index"]`` refers to)."""

    model = None  # the teacher ran when the cache was written
    scores_new_text = False  # targets exist only for the cached blocks

    def __init__(self, path: str | Path | None = None, split: str = "train", reader: CacheReader | None = None,
                 tail: str = "auto"):
        if tail not in ("auto", "bucket"):
            raise DistilleryError(f"CachedTeacher tail must be 'auto' or 'bucket', got {tail!r}")
        self.reader = reader if reader is not None else CacheReader(path)
        self.tail = tail
        if split not in self.reader.splits:
            raise DistilleryError(f"teacher cache {self.reader.root} has no split '{split}'")
        self.split = split
        self.name = str(self.reader.manifest.get("teacher", {}).get("name", "cache"))
        self._tokenizer = None

    @property
    def tokenizer(self):
        """The teacher's tokenizer, saved in the cache's ``tokenizer/`` folder."""
        if self._tokenizer is None:
            folder = self.reader.root / "tokenizer"
            if not folder.is_dir():
                raise DistilleryError(f"teacher cache {self.reader.root} holds no tokenizer/ folder; rewrite it with "
                                      f"`distillery cache`")
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(folder))
        return self._tokenizer

    @property
    def vocab_width(self) -> int:
        return self.reader.vocab_size

    def check(self, fingerprint: dict, cfg=None) -> None:
        """Refuse a cache written for other data, packing or loss temperature (message names the field)."""
        expected = {"data_fingerprint": fingerprint}
        if cfg is not None:
            expected.update(seq_len=cfg.data.seq_len, loss_temperature=cfg.loss.loss_temperature)
        self.reader.check(expected)

    def prefetch(self, batch: dict) -> None:
        """Nothing to start: shards are read on demand (memory-mapped)."""

    def identity(self) -> dict:
        """The manifest's record of the teacher that wrote the cache (name, weights hash)."""
        return dict(self.reader.manifest.get("teacher", {}))

    def eval_teacher(self) -> "CachedTeacher | None":
        """The same cache bound to its ``val`` split (None if no validation split was cached)."""
        return CachedTeacher(split="val", reader=self.reader, tail=self.tail) if "val" in self.reader.splits else None

    def targets(self, batch: dict, vocab_size: int | None = None) -> TeacherTargets:
        """Sparse targets ``(B, T, K)`` for ``batch`` (needs ``index`` and ``input_ids``; ``labels`` for the mask)."""
        if "index" not in batch:
            raise DistilleryError("a batch for a cached teacher needs 'index' (the block numbers the cache is keyed by)")
        if vocab_size is not None and vocab_size != self.reader.vocab_size:
            raise DistilleryError(f"teacher cache {self.reader.root} holds log-probs over {self.reader.vocab_size} "
                                  f"vocabulary entries, this run uses {vocab_size}")
        rows = self.reader.gather(batch["index"], self.split)
        ids = batch["input_ids"].detach().cpu().numpy()
        if ids.shape[1] != self.reader.seq_len:
            raise DistilleryError(f"batch blocks have {ids.shape[1]} tokens, the teacher cache has seq_len {self.reader.seq_len}")
        wrong = np.nonzero(block_digest(ids) != rows.digest)[0]
        if len(wrong):
            raise DistilleryError(f"block {int(rows.index[wrong[0]])} of split '{self.split}' has other tokens than "
                                  f"when the teacher cache {self.reader.root} was written (the data changed)")
        targets = self.reader.decode(rows, samples=self.tail == "auto")
        if "labels" in batch:
            mask = (batch["labels"] != -100).cpu()
            missing = mask & ~targets.mask
            if missing.any():
                b = int(missing.any(1).nonzero()[0, 0])
                raise DistilleryError(f"block {int(rows.index[b])} of split '{self.split}' has target positions the "
                                      f"teacher cache stored no targets for (the label mask changed)")
            targets.mask = mask
        return targets
