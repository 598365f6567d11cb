"""Attention alone at real FLUX.1 dims: PyTorch's SDPA against the alternatives one might write on a CPU, side by side.

    python -m benchmarks.attention [--tokens 4608] [--dtype bf16] [--repeat 3]

One [1, 24 heads, tokens, 128] joint attention (4608 tokens = 1024² image + 512 text), timed round-robin:
- `sdpa`: torch.nn.functional.scaled_dot_product_attention (the fused CPU flash kernel; what fluxkit and diffusers
  call);
- `chunked`: 512 queries at a time, QKᵀ and PV as batched matmuls in the input dtype, softmax accumulated in fp32;
- `flex`: torch.compile'd `flex_attention` with no score modification (compilation left out of the timing).
Each is checked against `sdpa` first. GFLOP/s counts QKᵀ and PV (4·L²·D per head), as benchmarks.blocks does.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import describe_machine, timeit_interleaved
from fluxkit.devices import parse_dtype

HEADS, HEAD_DIM, CHUNK = 24, 128, 512


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """Softmax(q kᵀ / sqrt(d)) v over query chunks, so the scores never exceed [B, H, chunk, L]."""
    out = torch.empty_like(q)
    kt = (k * q.shape[-1] ** -0.5).transpose(-1, -2)
    for i in range(0, q.shape[2], chunk):
        scores = torch.matmul(q[:, :, i : i + chunk], kt)  # [B, H, chunk, L]
        out[:, :, i : i + chunk] = torch.matmul(torch.softmax(scores, -1, dtype=torch.float32).to(q.dtype), v)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4608)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    from torch.nn.attention.flex_attention import flex_attention

    dtype = parse_dtype(args.dtype)
    print(describe_machine())
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, args.tokens, HEAD_DIM, dtype=dtype) for _ in range(3))
    flex = torch.compile(flex_attention)
    fns = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
        "chunked": lambda: chunked_attention(q, k, v),
        "flex": lambda: flex(q, k, v),
    }
    with torch.inference_mode():
        reference = fns["sdpa"]().float()
        errors = {name: (fn().float() - reference).abs().max().item() for name, fn in fns.items()}
        times = timeit_interleaved(fns, warmup=1, repeat=args.repeat)
    flops = 4 * HEADS * args.tokens**2 * HEAD_DIM
    print(f"{args.tokens} tokens, {HEADS} heads x {HEAD_DIM}, {args.dtype}")
    print(f"{'kernel':>8} {'s':>7} {'GFLOP/s':>8} {'vs sdpa':>8} {'max |diff|':>11}")
    for name, t in times.items():
        print(f"{name:>8} {t:>7.3f} {flops / t / 1e9:>8.0f} {t / times['sdpa']:>8.2f} {errors[name]:>11.3g}")


if __name__ == "__main__":
    main()
