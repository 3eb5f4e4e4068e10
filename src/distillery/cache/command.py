"""``distillery cache``: run the recipe's teacher over its data once and write a teacher cache.

::

    distillery cache RECIPE.yaml [key=value ...] [--out DIR] [--k 16] [--tail-samples 16] [--tail-seed 0]
    accelerate launch --num_processes N -m distillery.cli cache RECIPE.yaml ...   (GPUs: one shard set per rank)
    accelerate launch --config_file configs/accelerate/ddp_cpu.yaml -m distillery.cli cache RECIPE.yaml ...  (CPU)
    distillery cache --info DIR [--verify]
"""

from __future__ import annotations

import json
import os

from ..errors import DistilleryError
from .codec import LOGPROB_KINDS


def _rank_world() -> tuple[int, int]:
    """This process's rank and the number of processes (torchrun / ``accelerate launch`` set these)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def default_k_and_samples(cfg, k: int | None, tail_samples: int | None) -> tuple[int, int]:
    """``(k, m)`` for a recipe: what is given, else 16 top + 16 sampled-tail entries when the recipe's
    KD loss is forward KL (the draws make it unbiased) and top-32 + the tail bucket for the other
    divergences (they ignore draws, :mod:`distillery.losses.sparse`). Both fit 98 bytes/position at
    vocabularies up to 65,536."""
    from ..losses.sparse import uses_samples

    forward = uses_samples(cfg.loss.kd, cfg.loss.beta, cfg.loss.alpha)
    if tail_samples is None:
        tail_samples = 16 if forward else 0
    if k is None:
        k = 16 if tail_samples else 32
    return k, tail_samples


def run_cache(cfg, out_dir: str, *, k: int | None = None, batch_size: int = 8, shard_blocks: int = 256,
              logprob_encoding: str = "sqrt_u8", logprob_range: float = 32.0, progress: bool = True,
              tail_samples: int | None = None, tail_seed: int = 0) -> dict:
    """Load the recipe's teacher and data, then :func:`~distillery.cache.writer.write_cache` this rank's share
    (``k``/``tail_samples`` None: :func:`default_k_and_samples`)."""
    from ..data import build_datasets, tokenizer_hash
    from ..teachers import open_teacher, run_device, shared_vocab, teacher_device
    from .writer import write_cache

    if cfg.teacher.kind not in ("hf", "served"):
        raise DistilleryError(f"`distillery cache` runs a teacher over the data: teacher.kind must be 'hf' (in this "
                              f"process) or 'served' (a server), not '{cfg.teacher.kind}'")
    rank, world = _rank_world()
    teacher = open_teacher(cfg.teacher, teacher_device(cfg.teacher.device, run_device()))
    if teacher.model is None:  # a served teacher reports its top log-probs only: no tail to sample
        if tail_samples:
            raise DistilleryError(f"--tail-samples {tail_samples}: a served teacher reports its top log-probs only, so "
                                  "there is no tail to sample; pass --tail-samples 0 (the tail is then one bucket)")
        tail_samples = 0
        k = k or cfg.teacher.top_logprobs
    k, tail_samples = default_k_and_samples(cfg, k, tail_samples)
    tok = teacher.tokenizer
    splits = build_datasets(cfg.data, tok)
    vocab = shared_vocab(tok, teacher.vocab_width)
    info = {"teacher": teacher.identity(), "tokenizer_hash": tokenizer_hash(tok), "data_fingerprint": splits.fingerprint}
    return write_cache(lambda batch: teacher.targets(batch, vocab_size=vocab), splits, out_dir, k=k,
                       loss_temperature=cfg.loss.loss_temperature, manifest_info=info, shard_blocks=shard_blocks,
                       rank=rank, world_size=world, batch_size=batch_size, vocab_size=vocab,
                       logprob_encoding=logprob_encoding, logprob_range=logprob_range, tokenizer=tok,
                       progress=progress, tail_samples=tail_samples, tail_seed=tail_seed)


def _cmd_cache(args) -> int:
    from .info import cache_info

    if args.info:
        print(cache_info(args.info, verify=args.verify))
        return 0
    if not args.recipe:
        raise DistilleryError("give a recipe (distillery cache RECIPE.yaml) or --info DIR")
    from ..config import load_config

    cfg = load_config(args.recipe, args.overrides)
    out = args.out or cfg.teacher.cache_path
    if not out:
        raise DistilleryError("say where to write the cache: --out DIR or teacher.cache_path=DIR")
    cc = cfg.cache  # the recipe's cache: section; a flag given on the command line wins

    def pick(flag, setting):
        return setting if flag is None else flag

    summary = run_cache(cfg, out, k=pick(args.k, cc.k), batch_size=pick(args.batch_size, cc.batch_size),
                        shard_blocks=pick(args.shard_blocks, cc.shard_blocks),
                        logprob_encoding=pick(args.logprob_encoding, cc.logprob_encoding),
                        logprob_range=pick(args.logprob_range, cc.logprob_range), progress=not args.no_progress,
                        tail_samples=pick(args.tail_samples, cc.tail_samples), tail_seed=pick(args.tail_seed, cc.tail_seed))
    print(json.dumps(summary, indent=2))
    return 0


def add_cache_parser(subparsers) -> None:
    """Register ``distillery cache`` on the CLI's subparsers."""
    c = subparsers.add_parser("cache", help="run the teacher once and store its top-k targets (teacher cache)")
    c.add_argument("recipe", nargs="?", help="YAML recipe: its teacher and data (as for `distill`)")
    c.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.max_train_blocks=100")
    c.add_argument("--out", default=None, help="cache folder (default: teacher.cache_path)")
    c.add_argument("--k", type=int, default=None, help="top-k entries per position (default 16 with a sampled tail, "
                   "else 32: 98 bytes/token either way at vocab <= 65,536)")
    c.add_argument("--tail-samples", type=int, default=None, metavar="M",
                   help="draws per position from the teacher's tail distribution (default 16 when loss.kd is forward "
                        "KL, which they make unbiased; 0 otherwise: other divergences use the tail bucket)")
    c.add_argument("--tail-seed", type=int, default=None, help="seed of the tail draws (recorded in the manifest)")
    c.add_argument("--batch-size", type=int, default=None, help="blocks per teacher forward")
    c.add_argument("--shard-blocks", type=int, default=None, help="blocks per shard (the unit of commit and resume)")
    c.add_argument("--logprob-encoding", choices=LOGPROB_KINDS, default=None, help="default: cache.logprob_encoding (sqrt_u8)")
    c.add_argument("--logprob-range", type=float, default=None, help="most negative log-prob the sqrt_* codes hold")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.add_argument("--info", metavar="DIR", default=None, help="print what the cache at DIR holds and exit")
    c.add_argument("--verify", action="store_true", help="with --info: check every shard's sha256")
    c.set_defaults(func=_cmd_cache)
