"""What the hardware runs fast: the precision ``auto`` means on this machine.

On a CPU, bf16 is only worth it where the cores have bf16 units. Three cases were seen:

* an AMD EPYC with AVX2 only: bf16 matmul ~50x *slower* than fp32 (emulated);
* an Intel Xeon with AMX (``amx_bf16``): a 2048² bf16 matmul at 1,428 GFLOP/s against 162 for fp32;
* an AMD EPYC (Zen 4) with ``avx512_bf16``: 1024² bf16 at ~2.6x fp32 on one thread.

So ``cpu_bf16_fast`` decides from the CPU flags first (``amx_bf16``: yes; no bf16 flag at all: no)
and, where a flag says "maybe" (``avx512_bf16``, Arm's ``bf16``), measures once per process: the best
of a few ``(n, n) @ (n, n)`` matmuls (n = 1024) in each dtype on the current torch thread count, bf16
fast when ``t_fp32 / t_bf16 >= BF16_MIN_SPEEDUP``. ``DISTILLERY_CPU_BF16=1`` or ``0`` overrides the
probe (a fleet of identical machines, a reproducible test run).
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import torch

BF16_MIN_SPEEDUP = 1.5  # bf16 autocast also casts and runs some ops slower: demand a clear matmul win
PROBE_N = 1024


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (``flags`` on x86, ``Features`` on Arm); empty when unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def matmul_seconds(dtype: torch.dtype, n: int = PROBE_N, trials: int = 3) -> float:
    """Best wall time of one ``(n, n) @ (n, n)`` matmul in ``dtype`` on the CPU (after one warm-up)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(trials):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return best


def bf16_probe() -> dict:
    """The evidence behind ``cpu_bf16_fast``: flags seen, and (when measured) both timings and their ratio."""
    flags = cpu_flags()
    seen = sorted(flags & {"amx_bf16", "avx512_bf16", "bf16"})
    env = os.environ.get("DISTILLERY_CPU_BF16")
    if env in ("0", "1"):
        return {"flags": seen, "decided_by": "DISTILLERY_CPU_BF16", "fast": env == "1"}
    if "amx_bf16" in flags:
        return {"flags": seen, "decided_by": "amx_bf16 flag", "fast": True}
    if not seen:
        return {"flags": seen, "decided_by": "no bf16 flag", "fast": False}
    t32, t16 = matmul_seconds(torch.float32), matmul_seconds(torch.bfloat16)
    speedup = t32 / max(t16, 1e-12)
    return {"flags": seen, "decided_by": f"measured {PROBE_N}² matmul", "fp32_s": t32, "bf16_s": t16,
            "bf16_speedup": speedup, "threads": torch.get_num_threads(), "fast": speedup >= BF16_MIN_SPEEDUP}


@functools.lru_cache(maxsize=1)
def _cached_probe() -> dict:
    return bf16_probe()


def cpu_bf16_report() -> dict:
    """The probe's evidence for this process (flags, timings, ratio, decision), for benchmark records."""
    return dict(_cached_probe())


def cpu_bf16_fast() -> bool:
    """True when this CPU runs bf16 matmuls clearly faster than fp32 (probed once per process)."""
    return bool(_cached_probe()["fast"])


def auto_precision(device: str | torch.device) -> str:
    """``train.mixed_precision: auto`` on ``device``: ``'bf16'`` on a GPU that supports it and on a CPU where
    ``cpu_bf16_fast()``; ``'no'`` (fp32) elsewhere."""
    kind = torch.device(device).type
    if kind == "cuda":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if kind == "cpu":
        return "bf16" if cpu_bf16_fast() else "no"
    return "no"


def auto_dtype(device: str | torch.device) -> torch.dtype:
    """The weight dtype ``auto`` means for a frozen model (the teacher) on ``device``: bf16 where
    ``auto_precision`` picks bf16, else fp32."""
    return torch.bfloat16 if auto_precision(device) == "bf16" else torch.float32


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
LARGE_FREE_BYTES = 1 << 20


@functools.lru_cache(maxsize=1)
def _glibc():
    """The process's C library when it is glibc (it has ``mallopt`` and ``malloc_trim``), else None (musl, macOS)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def return_large_frees(threshold: int = LARGE_FREE_BYTES) -> bool:
    """Have glibc give every allocation of ``threshold`` bytes or more its own ``mmap``, so that freeing it
    returns its pages to the OS at once; True when the setting took effect.

    Why: glibc's threshold starts at 128 KiB but rises to the size of each mmapped block freed (up to 32 MiB),
    after which such blocks come from the heap, and a heap fragmented by freed tensors stays resident. An
    on-policy step allocates and frees blocks of every size (sampling, the teacher's forward, the chunked loss,
    the backward), and on the real pair the peak RSS grew step after step: 2.12 GB after 5 steps, 1.69 GB
    with this setting and loss chunks of 64 positions (benchmarks/onpolicy.py). The cost is a page fault per
    page of each large allocation, which is why buffers reused every decode step are kept
    (``ScreenedHead._scratch``). Only the process's own allocator changes; nothing on glibc-less systems (macOS,
    musl) or when the user set ``MALLOC_MMAP_THRESHOLD_`` (theirs wins). No library does this for us: PyTorch's
    CPU allocator is plain malloc.
    """
    libc = _glibc()
    if libc is None or os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))


def trim_heap() -> bool:
    """glibc's ``malloc_trim(0)``: give the free pages inside the heap back to the OS (what the mmap threshold above
    leaves: blocks under 1 MiB freed in between live ones). Called at the phase boundaries of a training step (after
    sampling, after the optimizer step): on the on-policy real pair it took the peak a further 0.03–0.04 GB down, at no
    measured speed cost. True when glibc did it."""
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(0))
