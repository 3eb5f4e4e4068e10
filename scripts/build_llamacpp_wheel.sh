#!/usr/bin/env bash
# Build (once) and cache the llama-cpp-python wheel: it compiles llama.cpp from source, ~19 minutes
# on 2 cores. The wheel lands in .cache/wheels/ and is reused by `make llamacpp` and CI's slow tier.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
mkdir -p .cache/wheels
if ls .cache/wheels/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
  echo "llama-cpp-python $VERSION wheel already cached"; exit 0
fi
PY="${PYTHON:-.venv/bin/python}"
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON}" \
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
  "$PY" -m pip wheel --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -w .cache/wheels
