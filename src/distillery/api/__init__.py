"""Served teacher: generate a chat data set through any OpenAI-compatible API (``distillery generate``).

Public API:

* :class:`ApiConfig` (with :class:`SamplingConfig`): the recipe, nested in ``RunConfig`` as ``api:``;
* :func:`generate_dataset` (``agenerate_dataset`` inside a running loop) -> summary dict;
* :func:`add_generate_parser`: argparse registration of ``generate`` for the CLI;
* :func:`api_targets` / :func:`token_id_map`: stored top log-probabilities -> sparse
  :class:`~distillery.targets.TeacherTargets` when the student shares the teacher's tokenizer;
* :func:`record_id`: the stable id of a record.

Heavy modules (openai, torch) load on first use, so registering the CLI verb stays cheap.
"""

from __future__ import annotations

from .command import add_generate_parser, load_api_config
from .config import ApiConfig, SamplingConfig
from .prompts import record_id

__all__ = ["ApiConfig", "SamplingConfig", "add_generate_parser", "load_api_config", "record_id",
           "generate_dataset", "agenerate_dataset", "api_targets", "token_id_map"]


def __getattr__(name: str):
    if name in ("generate_dataset", "agenerate_dataset"):
        from . import runner

        return getattr(runner, name)
    if name in ("api_targets", "token_id_map"):
        from . import targets

        return getattr(targets, name)
    raise AttributeError(f"module 'distillery.api' has no attribute {name!r}")
