#!/usr/bin/env python
"""Regenerate docs/errors.md from the bad-input catalogue (tests/bad_inputs.py).

Runs the catalogue's tests with DISTILLERY_WRITE_ERRORS_DOC=1, which makes the last test write the
file from the messages it saw; the same test, run without the variable, fails when the file is stale.

    .venv/bin/python scripts/gen_errors_doc.py
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    env = {**os.environ, "DISTILLERY_WRITE_ERRORS_DOC": "1"}
    sys.exit(subprocess.call([sys.executable, "-m", "pytest", "-q", "tests/test_bad_inputs.py"], cwd=ROOT, env=env))
