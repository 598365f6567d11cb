"""Measured matmul throughput per dtype on this machine: the peak other benchmarks compare against.

    python -m benchmarks.matmul_peak [--size 2048]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import describe_machine, timeit


def peak_gflops(dtype: torch.dtype, n: int, k: int | None = None, m: int | None = None) -> float:
    """GFLOP/s of an [n, k] @ [k, m] matmul (square n^2 by default)."""
    k, m = k or n, m or n
    a, b = torch.randn(n, k, dtype=dtype), torch.randn(k, m, dtype=dtype)
    return 2 * n * k * m / timeit(lambda: a @ b, repeat=10) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=2048)
    args = parser.parse_args()
    print(describe_machine())
    results = {str(dt).split(".")[-1]: peak_gflops(dt, args.size) for dt in (torch.float32, torch.bfloat16)}
    for name, g in results.items():
        print(f"{args.size}^2 matmul {name:9s} {g:8.1f} GFLOP/s")
    print(f"bf16 / fp32 speed ratio: {results['bfloat16'] / results['float32']:.2f}x")


if __name__ == "__main__":
    main()
