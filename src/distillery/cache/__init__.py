"""The teacher cache: run the teacher once, store sparse top-k targets (optionally with a sampled
tail, :mod:`.sampling`), distill many times from disk.

Format: ``docs/cache_format.md``. Public API:

* :func:`write_cache` (``writer``): teacher + datasets -> sharded cache folder (resumable, per rank).
* :class:`CacheReader` (``reader``): ``check(expected)``, ``targets(indices, split)``,
  ``measure_read_throughput()``.
* the cache as a teacher: :class:`distillery.teachers.CachedTeacher`.
* :func:`cache_info` (``info``) and :func:`add_cache_parser` (``command``): the ``distillery cache`` verb.
"""

from .codec import Encoding
from .command import add_cache_parser, run_cache
from .info import cache_info
from .reader import CacheReader
from .writer import write_cache

__all__ = ["CacheReader", "Encoding", "add_cache_parser", "cache_info", "run_cache", "write_cache"]
