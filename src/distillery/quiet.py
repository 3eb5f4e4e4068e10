"""Keep third-party noise out of every verb's output (issue 20): import-time log lines and loading bars.

* torchao (pulled in by transformers' quantizer registry whenever it is installed, e.g. by the ``[apple]`` extra)
  logs "Failed to load ..._C_mxfp8...so" for GPU kernels a CPU build lacks, and torch's pytree logs an Enum
  deprecation for each type torchao registers: neither concerns distillery's users. torchvision warns about its
  image extension on import. These loggers / warnings are silenced when ``distillery`` is imported.
* transformers' "Loading weights" / "Writing model shards" bars: off for the command line (``HF_HUB_DISABLE_PROGRESS_BARS``,
  read when transformers is imported; set it to 0 to see them). The Python API leaves them to the notebook.
"""

from __future__ import annotations

import logging
import os
import warnings

_IMPORT_NOISE = ("torchao", "torch.utils._pytree")


def quiet_imports() -> None:
    """Silence the import-time log lines and warnings of torchao, torch's pytree registry and torchvision."""
    for name in _IMPORT_NOISE:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"torchvision(\.|$)")
    warnings.filterwarnings("ignore", message=r".*(torchvision|Failed to load image Python extension).*")


def quiet_cli() -> None:
    """For the command line: no transformers/huggingface_hub loading bars (unless the user set the variable)."""
    quiet_imports()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def console():
    """A rich ``Console`` for the verbs' tables: the terminal's width on a TTY; piped (``| tee log``, CI), Rich
    would cut tables at 80 columns, so there it takes ``COLUMNS`` or 200."""
    import sys

    from rich.console import Console

    if sys.stdout.isatty():
        return Console()
    return Console(width=int(os.environ.get("COLUMNS") or 200))
