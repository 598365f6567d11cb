"""Tiled vs untiled VAE decode: seam error, peak memory and time, on a randomly initialised autoencoder.

    python -m benchmarks.vae_tiling          # real-size AE: 1024^2 untiled and tiled, then 2048^2 tiled only
    python -m benchmarks.vae_tiling --ae tiny --size 256 --big 512 --tile 128 --overlap 32   # a smoke run, seconds

Each decode runs in a fresh child process (same seed, so the same weights and latent), so the peak resident memory
of one case is not hidden by memory a previous case left with the allocator. On CPU the peak is the process's
VmHWM (Linux) reset after the model is built; on CUDA it is `torch.cuda.max_memory_allocated`. "activations" is the
peak minus the memory held just before the decode (model weights, latent, interpreter).

On the 2-core CPU the real-size defaults take many minutes (a 256^2 decode is ~5 s on one thread, 2048^2 tiled is
25 tiles of 512^2); run it on a GPU with --device cuda, or shrink --size/--big/--tile.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import torch

from fluxkit.autoencoder import AutoEncoder, seam_error
from fluxkit.params import TINY_AE, AutoEncoderParams

AES = {"flux": AutoEncoderParams(), "tiny": TINY_AE}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _decode_case(args: argparse.Namespace, size: int, tiled: bool, keep_output: bool) -> dict:
    """Child process: build the AE and the latent from the seed, decode once, report time/memory (and the output)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    ae = AutoEncoder(AES[args.ae]).to(device=device, dtype=dtype).eval()
    f = ae.params.downscale
    z = torch.randn(1, ae.params.z_channels, size // f, size // f, generator=torch.Generator().manual_seed(args.seed))
    z = z.to(device=device, dtype=dtype)
    if tiled:
        ae.enable_tiling(tile_size=args.tile, overlap=args.overlap)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
        before = _rss_kib("VmRSS") * 1024
    start = time.perf_counter()
    with torch.no_grad():
        out = ae.decode(z)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_kib("VmHWM") * 1024
    return {"seconds": seconds, "peak": peak, "before": before, "out": out.float().cpu() if keep_output else None}


def run_case(args: argparse.Namespace, size: int, tiled: bool, keep_output: bool = False) -> dict:
    with mp.get_context("spawn").Pool(1) as pool:
        result = pool.apply(_decode_case, (args, size, tiled, keep_output))
    mib = 2**20
    print(f"{'tiled' if tiled else 'untiled':>8} {size:>5}^2: {result['seconds']:8.1f} s   "
          f"peak {result['peak'] / mib:8.0f} MiB   activations {(result['peak'] - result['before']) / mib:8.0f} MiB",
          flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ae", choices=sorted(AES), default="flux", help="autoencoder size (random weights)")
    parser.add_argument("--size", type=int, default=1024, help="image side decoded both untiled and tiled")
    parser.add_argument("--big", type=int, default=2048, help="image side decoded tiled only (0 to skip)")
    parser.add_argument("--tile", type=int, default=512, help="tile size in pixels")
    parser.add_argument("--overlap", type=int, default=128, help="tile overlap in pixels")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.size <= args.tile:
        parser.error(f"--size {args.size} must exceed --tile {args.tile}, or the 'tiled' decode is not tiled")

    print(f"ae={args.ae} device={args.device} dtype={args.dtype} threads={args.threads} "
          f"tile={args.tile} overlap={args.overlap}", flush=True)
    untiled = run_case(args, args.size, tiled=False, keep_output=True)
    tiled = run_case(args, args.size, tiled=True, keep_output=True)
    with torch.device("meta"):  # seam_error only needs the tiling layout, not weights
        ae = AutoEncoder(AES[args.ae])
    ae.enable_tiling(tile_size=args.tile, overlap=args.overlap)
    err = seam_error(ae, untiled["out"], tiled["out"])
    print(f"tiled vs untiled at {args.size}^2 (output std {untiled['out'].std():.3f}): "
          f"max {err['max']:.4f} mean {err['mean']:.4f} | seam bands: max {err['seam_max']:.4f} "
          f"mean {err['seam_mean']:.4f} | elsewhere: max {err['interior_max']:.4f} mean {err['interior_mean']:.4f}")
    if args.big:
        run_case(args, args.big, tiled=True)


if __name__ == "__main__":
    main()
