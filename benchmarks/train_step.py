"""Seconds per tiny-base training step (forward + backward, batch 32, 128x128) in fp32 and under bf16 autocast: the
figure the tiny-family recipe's budget rests on.

    python -m benchmarks.train_step [--batch 32] [--repeat 3]

On CPUs without native bf16 the bf16 row shows the cost of emulation (training's `bf16 = "auto"` then uses fp32).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import describe_machine, timeit
from fluxkit.model import Flux
from fluxkit.params import PRESETS


def step_seconds(model: Flux, batch: int, bf16: bool, repeat: int) -> float:
    p = model.params
    g = torch.Generator().manual_seed(0)
    img = torch.randn(batch, 64, p.in_channels, generator=g)  # 128x128: 8x AE -> 16x16 latent -> 8x8 packed tokens
    txt = torch.randn(batch, 32, p.context_in_dim, generator=g)  # MiniLM's 32 token states
    ids = torch.zeros(batch, 64, 3), torch.zeros(batch, 32, 3)
    vec, t = torch.randn(batch, p.vec_in_dim, generator=g), torch.rand(batch, generator=g)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(img=img, img_ids=ids[0], txt=txt, txt_ids=ids[1], timesteps=t, y=vec)
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    return timeit(step, warmup=1, repeat=repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-bf16", action="store_true", help="only fp32 (bf16 emulation can take minutes)")
    args = parser.parse_args()
    print(describe_machine())
    torch.manual_seed(0)
    model = Flux(PRESETS["tiny-base"].flux)
    fp32 = step_seconds(model, args.batch, False, args.repeat)
    print(f"tiny-base train step, batch {args.batch}: fp32 {fp32:.2f} s")
    if not args.skip_bf16:
        bf16 = step_seconds(model, args.batch, True, args.repeat)
        print(f"tiny-base train step, batch {args.batch}: bf16 autocast {bf16:.2f} s ({fp32 / bf16:.2f}x fp32's speed)")


if __name__ == "__main__":
    main()
