"""Shared helpers for the benchmark scripts: machine description and a careful timer."""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch


def describe_machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from fluxkit.devices import cpu_has_fast_bf16

    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"native bf16: {cpu_has_fast_bf16()}")


def timeit(fn, *, warmup: int = 2, repeat: int = 5) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)
