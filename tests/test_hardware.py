"""hardware.py: the precision ``auto`` picks, from a probe of the CPU (flags, then a measured matmul)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from distillery import hardware


@pytest.fixture
def probe(monkeypatch):
    """Set the CPU flags and the matmul timings the probe sees; the per-process cache is cleared around it."""
    monkeypatch.delenv("DISTILLERY_CPU_BF16", raising=False)
    calls = []

    def set_cpu(flags, fp32_s=None, bf16_s=None):
        monkeypatch.setattr(hardware, "cpu_flags", lambda: set(flags))

        def timed(dtype, *a, **k):
            calls.append(dtype)
            return fp32_s if dtype == torch.float32 else bf16_s
        monkeypatch.setattr(hardware, "matmul_seconds", timed)
        hardware._cached_probe.cache_clear()
        return calls

    yield set_cpu
    hardware._cached_probe.cache_clear()


def test_amx_cpu_picks_bf16_without_measuring(probe):
    calls = probe({"avx512f", "amx_bf16", "amx_tile", "avx512_bf16"})
    assert hardware.cpu_bf16_fast() is True
    assert hardware.auto_precision("cpu") == "bf16" and hardware.auto_dtype(torch.device("cpu")) == torch.bfloat16
    assert calls == []


def test_cpu_without_bf16_units_picks_fp32_without_measuring(probe):
    calls = probe({"avx2", "fma", "avx512f"})
    assert hardware.cpu_bf16_fast() is False
    assert hardware.auto_precision("cpu") == "no" and hardware.auto_dtype("cpu") == torch.float32
    assert calls == []


@pytest.mark.parametrize("fp32_s, bf16_s, fast", [(0.080, 0.030, True),    # Zen 4 measured here: ~2.6x
                                                  (0.080, 4.0, False),     # emulated bf16: ~50x slower
                                                  (0.080, 0.060, False)])  # 1.33x: below BF16_MIN_SPEEDUP
def test_avx512_bf16_flag_is_decided_by_the_measured_matmul(probe, fp32_s, bf16_s, fast):
    calls = probe({"avx512f", "avx512_bf16"}, fp32_s, bf16_s)
    assert hardware.cpu_bf16_fast() is fast
    assert hardware.auto_precision("cpu") == ("bf16" if fast else "no")
    hardware.cpu_bf16_fast()
    assert sorted(map(str, calls)) == ["torch.bfloat16", "torch.float32"]  # measured once per process
    info = hardware._cached_probe()
    assert info["bf16_speedup"] == pytest.approx(fp32_s / bf16_s) and info["decided_by"].startswith("measured")


def test_environment_overrides_the_probe(probe, monkeypatch):
    probe({"amx_bf16"})
    monkeypatch.setenv("DISTILLERY_CPU_BF16", "0")
    hardware._cached_probe.cache_clear()
    assert hardware.auto_precision("cpu") == "no"
    probe({"avx2"})
    monkeypatch.setenv("DISTILLERY_CPU_BF16", "1")
    hardware._cached_probe.cache_clear()
    assert hardware.auto_precision("cpu") == "bf16"


def test_gpu_and_other_devices():
    expected = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    assert hardware.auto_precision("cuda") == expected
    assert hardware.auto_precision("meta") == "no" and hardware.auto_dtype("meta") == torch.float32


def test_real_probe_is_consistent_with_its_evidence(monkeypatch):
    monkeypatch.delenv("DISTILLERY_CPU_BF16", raising=False)
    info = hardware.bf16_probe()
    assert isinstance(info["fast"], bool)
    if "bf16_speedup" in info:
        assert info["bf16_speedup"] == pytest.approx(info["fp32_s"] / info["bf16_s"])
        assert info["fast"] == (info["bf16_speedup"] >= hardware.BF16_MIN_SPEEDUP)
    else:
        assert info["fast"] == ("amx_bf16" in info["flags"])
    assert hardware.matmul_seconds(torch.float32, n=64, trials=1) > 0


HEAP_PROBE = """
import sys, torch
from distillery.hardware import return_large_frees
took = return_large_frees() if sys.argv[1] == "1" else None
def rss(): return int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]) * 1024
warm = torch.ones(4 << 18); del warm  # glibc's default: freeing a 4 MiB mmapped block raises its threshold to 4 MiB
big, small = [], []
for i in range(48):
    big.append(torch.ones(2 << 18)); small.append(torch.ones(16000))  # 2 MiB each, 64 KiB live blocks between
before = rss(); del big
if sys.argv[1] == "trim":
    from distillery.hardware import trim_heap
    took = trim_heap()
print(took, (before - rss()) / 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("env", [{}, {"MALLOC_MMAP_THRESHOLD_": "99999999"}])
def test_return_large_frees_gives_freed_tensors_back_unless_the_user_set_the_threshold(env):
    """96 MiB of freed 2 MiB tensors leave the resident set with the setting; under glibc's default (which the
    user's own MALLOC_MMAP_THRESHOLD_ keeps: we do not override it) they stay in a fragmented heap."""
    def freed(arg):
        out = subprocess.run([sys.executable, "-c", HEAP_PROBE, arg], env={**os.environ, **env}, capture_output=True,
                             text=True, check=True).stdout.split()
        return out[0], float(out[1])
    took, mib = freed("1")
    if env:
        assert took == "False" and mib < 16
    else:
        assert took == "True" and mib > 90
        assert freed("0")[1] < 16  # without it the same frees stay resident (what the setting is for)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_trim_heap_returns_the_free_pages_left_between_live_blocks():
    """Under glibc's default the 96 MiB freed above stay resident; ``trim_heap`` gives them back."""
    out = subprocess.run([sys.executable, "-c", HEAP_PROBE, "trim"], capture_output=True, text=True, check=True).stdout
    took, mib = out.split()
    assert took == "True" and float(mib) > 90
