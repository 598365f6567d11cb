"""`fluxkit eval`: generate the evaluation suite with any model and sampler settings, and score it.

fluxkit eval --model fluxkit-tiny-dev --out runs/eval-dev
fluxkit eval --model fluxkit-tiny-schnell --steps 2 --quick
fluxkit eval --ground-truth            # the checker's ceiling on the generator's own renders
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="built-in name, folder or repo id (default: fluxkit-tiny-dev)")
    p.add_argument("--transformer", help="a single-file transformer replacing the model's own")
    p.add_argument("--ground-truth", action="store_true", help="score the scenes' own renders instead of a model")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    p.add_argument("--guidance", type=float, help="distilled guidance (default: the model's)")
    p.add_argument("--true-cfg", type=float, default=1.0, help="true CFG scale against the empty prompt (> 1 enables)")
    p.add_argument("--cache", help="step cache: fbcache:THRESHOLD or teacache:THRESHOLD")
    p.add_argument("--quantize", help="quantize the transformer (int8, fp8, q8_0, q4_0, ...)")
    p.add_argument("--quick", action="store_true", help="4 prompts per category instead of the full suite")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds per prompt")
    p.add_argument("--size", type=int, nargs=2, default=[128, 128], metavar=("WIDTH", "HEIGHT"))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", type=Path, help="folder for results.json and grid.png")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.set_defaults(run=run)


def parse_cache(text: str):
    from ..step_cache import FirstBlockCacheConfig, TeaCacheConfig

    kind, _, value = text.partition(":")
    kinds = {"fbcache": FirstBlockCacheConfig, "teacache": TeaCacheConfig}
    if kind not in kinds:
        raise ValueError(f"--cache must be fbcache[:T] or teacache[:T], got {text!r}")
    try:
        return kinds[kind](threshold=float(value)) if value else kinds[kind]()
    except ValueError:
        raise ValueError(f"--cache threshold must be a number, got {value!r}") from None


def make_generate(pipe, width: int, height: int, steps: int | None, guidance: float | None, true_cfg: float):
    """The eval's `generate(prompts, seeds)` over a pipeline: one CPU generator per image, so images do not depend on
    how the suite is batched."""
    import torch

    def generate(prompts: list[str], seeds: list[int]):
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        return pipe(
            prompts,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance,
            true_cfg_scale=true_cfg,
            generator=gens,
        ).images

    return generate


def run(args) -> int:
    from .run import run_eval, score_ground_truth
    from .suite import build_suite

    suite = build_suite(quick=args.quick, seeds=tuple(args.seeds), size=tuple(args.size))
    if args.ground_truth:
        score_ground_truth(suite, args.out)
        return 0
    import torch

    from ..devices import default_device, parse_dtype
    from ..pipeline import FluxPipeline

    cache = parse_cache(args.cache) if args.cache else None
    device = default_device() if args.device == "auto" else torch.device(args.device)
    dtype = None if args.dtype == "auto" else parse_dtype(args.dtype)
    pipe = FluxPipeline.from_pretrained(
        args.model or "fluxkit-tiny-dev",
        torch_dtype=dtype,
        device=device,
        transformer=args.transformer,
        quantize=args.quantize,
    )
    if cache is not None:
        pipe.transformer.enable_cache(cache)
    generate = make_generate(pipe, args.size[0], args.size[1], args.steps, args.guidance, args.true_cfg)
    summary = run_eval(generate, suite, args.out, batch_size=args.batch_size)
    if cache is not None:
        stats = pipe.transformer.step_cache.stats()
        print(
            f"step cache: {stats['calls']} calls, {stats['skipped']} skipped "
            f"({stats['call_ratio']:.2f}x fewer full transformer calls)"
        )
        summary["overall"]["step_cache"] = stats
    return 0
