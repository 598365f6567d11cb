"""Device and dtype defaults: CUDA when present, else CPU; bf16 where the processor computes it fast."""

from __future__ import annotations

import functools
import platform

import torch

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 dot products (AVX512-BF16 or AMX-BF16).

    On a 2-core AMD EPYC with avx512_bf16 bf16 matmuls run about 3-4x faster than fp32; on an AVX2-only EPYC bf16 is
    emulated, ~100x slower than fp32 (0.8 vs 109 GFLOP/s at 1024²; `python -m benchmarks.matmul_peak --size 1024`).
    """
    if platform.system() != "Linux":
        return platform.machine() == "arm64" and platform.system() == "Darwin"  # Apple M2+ has bf16 in AMX
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_is_fast(device: torch.device | str) -> bool:
    """Whether bf16 compute pays off on `device`: CUDA GPUs with bf16, CPUs with native bf16 dot products, MPS."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_fast_bf16() if device.type == "cpu" else device.type == "mps"


def default_dtype(device: torch.device | str) -> torch.dtype:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return torch.bfloat16


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(sorted(DTYPES))}") from None
