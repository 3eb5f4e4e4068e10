"""kill -9 harness: run a command in a subprocess, SIGKILL it at seeded random points, rerun it until done.

A kill point is ``(target, delay)``: wait until ``progress()`` (a cheap probe of what the process has
committed so far: checkpoints, cache shards, output lines) reaches ``target``, then ``delay`` seconds
more, then SIGKILL. The points are drawn from ``random.Random(seed)``, spread over the run (sorted
targets), so one seed always asks for the same points; the moment the kill lands inside a step
still depends on timing, which is what we want to sample. After every kill ``check()`` asserts the
on-disk invariants (nothing partial looks finished); the last run goes to completion.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]


@dataclass
class KillLog:
    """What happened: the seed, the requested points, the progress seen at each kill, the runs made."""

    seed: int
    points: list[tuple[int, float]]
    progress_at_kill: list[int] = field(default_factory=list)
    finished_before_kill: int = 0
    runs: int = 0

    def __str__(self) -> str:
        return (f"seed {self.seed}: points {self.points}, progress at the kills {self.progress_at_kill}, "
                f"{self.finished_before_kill} finished before their kill, {self.runs} runs")


def child_env(**extra: str) -> dict:
    """Environment for the children: one thread (bitwise-stable CPU maths), this test's import path."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "DISTILLERY_DEBUG": "",
            "PYTHONPATH": os.pathsep.join([str(REPO / "src"), *sys.path]), **extra}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "distillery.cli", *args]


def run_to_end(argv: list[str], env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, env=env or child_env(), timeout=timeout)
    assert proc.returncode == 0, f"{argv} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


def draw_points(seed: int, n: int, first: int, last: int, max_delay: float) -> list[tuple[int, float]]:
    """``n`` kill points: targets sorted over ``[first, last]`` (repeats allowed), delays in ``[0, max_delay)``."""
    rng = random.Random(seed)
    targets = sorted(rng.randint(first, last) for _ in range(n))
    return [(t, round(rng.uniform(0.0, max_delay), 4)) for t in targets]


def kill_and_resume(argv: list[str], progress: Callable[[], int], points: list[tuple[int, float]], seed: int,
                    check: Callable[[], None] | None = None, env: dict | None = None,
                    final_argv: list[str] | None = None, timeout: float = 300) -> KillLog:
    """Run ``argv`` once per kill point, SIGKILL it there, call ``check()``; then run ``final_argv`` to the end."""
    log = KillLog(seed=seed, points=points)
    env = env or child_env()
    for target, delay in points:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        log.runs += 1
        deadline = time.monotonic() + timeout
        while proc.poll() is None and progress() < target and time.monotonic() < deadline:
            time.sleep(0.003)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            log.progress_at_kill.append(progress())
        else:
            err = proc.stderr.read().decode(errors="replace")
            assert proc.returncode == 0, f"run {log.runs} failed before its kill ({log}):\n{err[-3000:]}"
            log.finished_before_kill += 1
        proc.stderr.close()
        if check is not None:
            check()
    run_to_end(final_argv or argv, env, timeout)
    log.runs += 1
    return log
