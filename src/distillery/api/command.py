"""`distillery generate RECIPE.yaml [key=value ...]`: recipe loading and argparse registration.

A recipe is either a standalone :class:`ApiConfig` mapping, or a run recipe with an ``api:`` section
(only that section is used here). Overrides are ``key=value`` with or without the ``api.`` prefix
(``sampling.max_tokens=64`` or ``api.sampling.max_tokens=64``).

Exit status: 0 when every planned record is in the output, 1 when some failed (rerun to retry them),
2 on a user error (printed as ``error: ...`` by the CLI).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

from ..errors import DistilleryError
from .config import ApiConfig, validation_message

def load_api_config(path: str | Path, overrides: list[str] | None = None) -> ApiConfig:
    """Read a generate recipe (standalone or with an ``api:`` section), apply overrides, validate."""
    from ..config import apply_overrides

    p = Path(path)
    if not p.is_file():
        raise DistilleryError(f"recipe '{p}' does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise DistilleryError(f"{p}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise DistilleryError(f"{p}: a recipe must be a mapping, got {type(data).__name__}")
    section = data["api"] if "api" in data else data
    if not isinstance(section, dict):
        raise DistilleryError(f"{p}: 'api' must be a mapping")
    stripped = [o[4:] if o.startswith("api.") else o for o in (overrides or [])]
    section = apply_overrides(dict(section), stripped)
    try:
        return ApiConfig.model_validate(section)
    except ValidationError as err:
        raise DistilleryError(f"{p}: {validation_message(err, 'api')}") from None


def _cmd_generate(args) -> int:
    from .runner import generate_dataset

    logger = logging.getLogger("distillery.api")
    if not logger.handlers and not args.quiet:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    cfg = load_api_config(args.recipe, args.overrides)
    summary = generate_dataset(cfg)
    print(json.dumps(summary, indent=2))
    if summary["failures_outstanding"]:
        print(f"{summary['failures_outstanding']} record(s) failed (reasons in {summary['failures_file']}); "
              "rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0


def add_generate_parser(subparsers) -> None:
    """Register ``generate`` on an argparse sub-parser set; the handler returns the exit status."""
    g = subparsers.add_parser("generate", help="teacher answers from an OpenAI-compatible server -> chat data set (resumable)")
    g.add_argument("recipe", help="YAML recipe: ApiConfig fields, or a run recipe with an 'api:' section")
    g.add_argument("overrides", nargs="*", help="key=value overrides, e.g. sampling.max_tokens=64 concurrency=16")
    g.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    g.set_defaults(func=_cmd_generate)
