"""``build_datasets``: config + tokenizer -> train/validation ``BlockDataset``s and their fingerprint.

Steps: resolve files -> read records -> tokenize text documents into one stream and render chat
conversations -> pack into blocks of ``seq_len + 1`` -> split -> fingerprint.

Split: with ``data.validation`` files, those files are the validation split and ``val_fraction`` is
ignored; otherwise ``val_fraction`` of the blocks is held out by a seeded permutation
(``split.split_blocks``). Each split is stored in its shuffled order and capped to its first
``max_*_blocks``; ``index`` is a block's position in its split. All of it is a pure function of the
file contents, the tokenizer and the settings, which the fingerprint records; a teacher cache keyed
by ``index`` is valid exactly when the fingerprints match.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import DistilleryError
from .chat import default_system_prompt, has_generation_tags, render_chat, use_chat_template
from .pack import PACKING, BlockDataset, pack_chat, text_starts
from .readers import read_source, resolve_sources
from .split import permutation, split_blocks
from .tokenize import tokenize_documents

FINGERPRINT_VERSION = 1


@dataclass
class DataSplits:
    """``train`` and ``val`` (None when nothing is held out) datasets, and their JSON-able fingerprint."""

    train: BlockDataset
    val: BlockDataset | None
    fingerprint: dict
    stats: dict = field(default_factory=dict)


def tokenizer_hash(tokenizer) -> str:
    """sha256 of what decides token ids: sorted vocab, merges, added/special tokens, normaliser,
    pre-tokeniser, and the chat template. Runtime settings (padding, truncation) are left out."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        keep = {k: spec.get(k) for k in ("model", "added_tokens", "normalizer", "pre_tokenizer")}
        h.update(json.dumps(keep, sort_keys=True, ensure_ascii=False).encode())
    else:  # a slow (Python) tokenizer: its vocabulary is all we can read portably
        h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    special = {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())}
    extra = {"special": special, "chat_template": getattr(tokenizer, "chat_template", None)}
    h.update(json.dumps(extra, sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0  # padding is masked everywhere, so any id will do


def build_blocks(entries: list[str], cfg, tokenizer, what: str, progress: bool = True,
                 chat_renderer=None) -> tuple[BlockDataset, list[dict], dict]:
    """All blocks of one corpus in corpus order (text blocks first, then chat blocks).

    ``chat_renderer(record) -> (ids, mask, rows | None)``, when given, renders conversations instead of
    :func:`render_chat` and attaches per-token rows of a teacher side table (the API teacher's
    stored top log-probabilities); the dataset then carries ``teacher_rows``.
    Returns ``(dataset, file_infos, stats)``; ``what`` names the config key in messages.
    """
    t0 = time.perf_counter()
    sources = resolve_sources(entries, cfg.format)
    texts, chats = [], []
    for src in sources:
        for rec in read_source(src, cfg.text_field):
            (texts if rec.messages is None else chats).append(rec)
    stream = tokenize_documents((r.text for r in texts), tokenizer, progress=progress)
    starts = text_starts(len(stream), cfg.seq_len)
    stats = {"documents": len(texts), "text_tokens": int(len(stream)), "conversations": len(chats)}
    tokens, all_starts = [stream], [starts]
    targets = real = teacher_rows = positions = None  # text only: every token is a target and real
    if chats:
        use_tags = has_generation_tags(tokenizer)
        _note_default_system(chats, tokenizer, what)
        bar = tqdm(chats, desc="chat template", delay=1.0, disable=not progress, leave=False)
        if chat_renderer is None:
            rendered, rows = [render_chat(r, tokenizer, use_tags) for r in bar], None
        else:
            triples = [chat_renderer(r) for r in bar]
            rendered, rows = [(ids, mask) for ids, mask, _ in triples], [r for _, _, r in triples]
        packed = pack_chat(rendered, cfg.seq_len, _pad_id(tokenizer), rows=rows)
        tokens.append(packed["tokens"])
        targets = torch.from_numpy(np.concatenate([np.ones(len(stream), bool), packed["targets"]]))
        real = torch.from_numpy(np.concatenate([np.ones(len(stream), bool), packed["real"]]))
        # per-conversation positions (pack.model_inputs); a text block's input token at offset o is at o mod T
        positions = torch.from_numpy(np.concatenate([np.arange(len(stream), dtype=np.int64) % cfg.seq_len,
                                                     packed["positions"]]))
        if rows is not None:
            teacher_rows = torch.from_numpy(np.concatenate([np.full(len(stream), -1, np.int64), packed["rows"]]))
        all_starts.append(packed["starts"] + len(stream))
        stats.update(chat_tokens=int(sum(len(ids) for ids, _ in rendered)), chat_mask="generation tags" if use_tags
                     else "prefix rendering", truncated=packed["truncated"], dropped=packed["dropped"])
        if packed["truncated"]:
            warnings.warn(f"{what}: {packed['truncated']} of {len(chats)} conversations are longer than "
                          f"data.seq_len + 1 = {cfg.seq_len + 1} tokens and were truncated"
                          + (f"; {packed['dropped']} lost every assistant token and were dropped" if packed["dropped"] else ""),
                          stacklevel=2)
    names = ", ".join(s.name for s in sources)
    n_tokens = sum(len(t) for t in tokens)
    if n_tokens == 0:
        raise DistilleryError(f"{what}: no tokens in {names} (the corpus is empty)")
    starts = np.concatenate(all_starts)
    if len(starts) == 0:
        raise DistilleryError(f"{what}: {names} make only {n_tokens} tokens, fewer than one block of "
                              f"data.seq_len + 1 = {cfg.seq_len + 1}")
    ds = BlockDataset(torch.from_numpy(np.concatenate(tokens)), torch.from_numpy(starts), cfg.seq_len,
                      targets=targets, real=real, teacher_rows=teacher_rows, positions=positions,
                      chat_from=len(stream) if chats else None)
    stats.update(blocks=len(ds), seconds=round(time.perf_counter() - t0, 3))
    return ds, [s.info() for s in sources], stats


def _note_default_system(chats: list, tokenizer, what: str) -> None:
    """Say when the template gives system-less conversations a system prompt of its own (SmolLM2's does):
    the student would learn that prompt as part of every such conversation."""
    bare = sum(1 for r in chats if r.messages[0]["role"] not in ("system", "developer"))
    injected = default_system_prompt(tokenizer) if bare else None
    if injected:
        shown = injected if len(injected) <= 80 else injected[:77] + "..."
        warnings.warn(f"{what}: {bare} of {len(chats)} conversations have no system message, and the chat template "
                      f"adds its own to them ({shown!r}); give them a system message, or set data.chat_template "
                      "(e.g. 'chatml') to render them without one", stacklevel=3)


def build_datasets(cfg, tokenizer, max_positions: int | None = None, progress: bool = True,
                   chat_renderer=None) -> DataSplits:
    """Read, tokenize, pack and split the data of ``cfg`` (a ``DataConfig``).

    Args:
        max_positions: the model's ``max_position_embeddings``; ``cfg.seq_len`` above it is an error.
        progress: show tqdm bars for steps that take over a second.
        chat_renderer: renders conversations instead of the chat template alone (see
            :func:`build_blocks`); its ``name`` attribute goes into the fingerprint.
    Returns:
        ``DataSplits(train, val, fingerprint, stats)``; items are dicts of ``input_ids, labels,
        attention_mask (T,)`` and ``index ()``, see ``BlockDataset``.
    """
    if max_positions is not None and cfg.seq_len > max_positions:
        raise DistilleryError(f"data.seq_len ({cfg.seq_len}) is above the model's limit "
                              f"max_position_embeddings={max_positions}")
    if not cfg.train:
        raise DistilleryError("data.train is empty: name at least one file, folder or demo corpus")
    use_chat_template(tokenizer, cfg.chat_template)  # data.chat_template: set on the tokenizer the student ships with
    full, files, stats = build_blocks(cfg.train, cfg, tokenizer, "data.train", progress, chat_renderer)
    val_files: list[dict] = []
    if cfg.validation:
        vfull, val_files, vstats = build_blocks(cfg.validation, cfg, tokenizer, "data.validation", progress,
                                                chat_renderer)
        train_ids = permutation(len(full), cfg.seed)[:cfg.max_train_blocks]
        val_ids = permutation(len(vfull), cfg.seed)[:cfg.max_val_blocks]
        train, val = full.subset(train_ids), vfull.subset(val_ids)
        stats = {"train": stats, "validation": vstats}
    else:
        train_ids, val_ids = split_blocks(len(full), cfg.val_fraction, cfg.seed, cfg.max_train_blocks,
                                          cfg.max_val_blocks)
        train, val = full.subset(train_ids), (full.subset(val_ids) if len(val_ids) else None)
        stats = {"train": stats}
    fingerprint = {
        "version": FINGERPRINT_VERSION,
        "files": files,
        "validation_files": val_files,
        "tokenizer": tokenizer_hash(tokenizer),
        "seq_len": cfg.seq_len,
        "format": cfg.format,
        "text_field": cfg.text_field,
        "split": {"mode": "files" if cfg.validation else "fraction", "val_fraction": cfg.val_fraction,
                  "seed": cfg.seed, "max_train_blocks": cfg.max_train_blocks, "max_val_blocks": cfg.max_val_blocks},
        "blocks": {"train": len(train), "val": len(val) if val is not None else 0},
    }
    if full.positions is not None:  # packed conversations see only themselves (a cache made before does not match)
        fingerprint["packing"] = f"per-conversation attention, {PACKING}"  # other blocks: caches made before differ
    if chat_renderer is not None:  # the token ids come from somewhere else than the chat template alone
        fingerprint["chat_renderer"] = str(getattr(chat_renderer, "name", "custom"))
    return DataSplits(train=train, val=val, fingerprint=fingerprint, stats=stats)
