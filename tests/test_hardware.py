"""hardware.py: the precision ``auto`` picks, from a probe of the CPU (flags, then a measured matmul)."""

from __future__ import annotations

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
