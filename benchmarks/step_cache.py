"""Step caching (issue 5, item 5): transformer calls saved, speedup and quality loss, per policy and threshold.

    python -m benchmarks.step_cache                        # fluxkit-tiny-dev, 28 steps, fbcache + teacache, quick eval
    python -m benchmarks.step_cache --model black-forest-labs/FLUX.1-dev --size 512 --eval none

Every configuration renders the same images (the first --num-prompts eval-suite prompts x --seeds, one image per
pipeline call, so each image's skip decisions are its own); the uncached run is the reference:
- "x fewer": transformer calls / fully computed calls over those images (the step cache's own counters);
- "speedup": uncached seconds per image / cached seconds per image, measured in the same run;
- "PSNR" against the uncached image (pooled over the images, and the worst single image);
- "eval": `fluxkit eval` prompt following (pass rate) with the cache on, and its change against uncached in points.
  The eval generates --eval-batch images per call like `fluxkit eval --cache`; a batch shares its skip decisions,
  so its own call ratio is listed too ("eval x").

TeaCache's rescaling polynomial (fluxkit.step_cache.TEACACHE_FLUX_COEFFS) was fitted on FLUX.1; for other models
(the tiny family) `--teacache-rescale identity` accumulates the raw relative L1 change (coefficients (1, 0)). By
default both are measured. Targets (issue 5): >= 1.5x fewer calls at 28 steps (aim 1.8x) for <= 3 points of eval.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch

from benchmarks.common import describe_machine
from benchmarks.quant_quality import (
    add_sampling_arguments,
    eval_accuracy,
    fmt,
    image_size,
    psnr_summary,
    render,
    suite_for,
    suite_prompts,
    write_json,
)
from fluxkit.devices import parse_dtype
from fluxkit.step_cache import TEACACHE_FLUX_COEFFS, FirstBlockCacheConfig, TeaCacheConfig

RESCALES = {"flux": TEACACHE_FLUX_COEFFS, "identity": (1.0, 0.0)}


@dataclass(frozen=True)
class Setting:
    label: str  # e.g. "teacache/identity"
    config: FirstBlockCacheConfig | TeaCacheConfig | None  # None: uncached


def settings(args: argparse.Namespace) -> list[Setting]:
    """Uncached first (the reference), then each policy at each threshold."""
    out = [Setting("none", None)]
    out += [Setting("fbcache", FirstBlockCacheConfig(threshold=t)) for t in args.fbcache]
    out += [Setting(f"teacache/{name}", TeaCacheConfig(threshold=t, coefficients=RESCALES[name]))
            for name in args.teacache_rescale for t in args.teacache]
    return out


def _calls(model, setting: Setting, n_images: int, steps: int) -> tuple[int, int]:
    """(transformer calls, fully computed calls) since the cache was enabled."""
    if setting.config is None:
        return n_images * steps, n_images * steps
    stats = model.step_cache.stats()
    return stats["calls"], stats["full"]


def measure(args: argparse.Namespace) -> list[dict]:
    from fluxkit.pipeline import FluxPipeline

    pipe = FluxPipeline.from_pretrained(args.model, torch_dtype=parse_dtype(args.dtype))
    model = pipe.transformer
    size, steps = image_size(args, pipe), args.steps or pipe.spec.default_steps
    prompts, suite = suite_prompts(args.num_prompts, size), suite_for(args, size)
    n_images = len(prompts) * len(args.seeds)
    render(pipe, prompts[:1], args.seeds[:1], size, steps, args.guidance, 1)  # warm-up: first calls allocate
    rows, reference = [], None
    for setting in settings(args):
        model.disable_cache()
        if setting.config is not None:
            model.enable_cache(setting.config)  # a fresh cache: counters start at zero
        start = time.perf_counter()
        images = render(pipe, prompts, args.seeds, size, steps, args.guidance, 1)
        seconds = (time.perf_counter() - start) / n_images
        calls, full = _calls(model, setting, n_images, steps)
        row = {"setting": setting.label, "threshold": getattr(setting.config, "threshold", None), "calls": calls,
               "full": full, "call_ratio": calls / full, "s_per_image": seconds}
        row.update({"psnr": math.inf, "worst": math.inf} if reference is None else psnr_summary(images, reference))
        if setting.config is not None:
            model.enable_cache(setting.config)  # count the eval's calls on their own
        row["eval"] = eval_accuracy(pipe, suite, size, steps, args.guidance, args.eval_batch)
        if suite is not None:
            eval_calls, eval_full = _calls(model, setting, len(suite), steps)
            row["eval_call_ratio"] = eval_calls / eval_full
        rows.append(row)
        reference = images if reference is None else reference
    model.disable_cache()
    base = rows[0]
    for row in rows:
        row["speedup"] = base["s_per_image"] / row["s_per_image"]
        if row["eval"] is not None:
            row["eval_delta_points"] = 100 * (row["eval"] - base["eval"])
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'cache':<19} {'thresh':>6} {'calls':>6} {'full':>6} {'x fewer':>8} {'s/img':>7} {'speedup':>8} "
             f"{'PSNR dB':>8} {'worst dB':>9} {'eval':>6} {'d eval':>7} {'eval x':>7}"]
    for r in rows:
        evl = None if r["eval"] is None else 100 * r["eval"]
        lines.append(f"{r['setting']:<19} {fmt(r['threshold'], '.3g', 6)} {r['calls']:>6} {r['full']:>6} "
                     f"{r['call_ratio']:>7.2f}x {r['s_per_image']:>7.3f} {r['speedup']:>7.2f}x {r['psnr']:>8.2f} "
                     f"{r['worst']:>9.2f} {fmt(evl, '.1f', 5)}% {fmt(r.get('eval_delta_points'), '+.1f', 7)} "
                     f"{fmt(r.get('eval_call_ratio'), '.2f', 6)}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fluxkit-tiny-dev", help="built-in name, folder or repo id")
    parser.add_argument("--fbcache", type=float, nargs="*", default=[0.05, 0.08, 0.12, 0.2],
                        help="first-block cache thresholds (the flag alone: leave the policy out)")
    parser.add_argument("--teacache", type=float, nargs="*", default=[0.2, 0.4, 0.6, 0.8],
                        help="TeaCache thresholds (the flag alone: leave the policy out)")
    parser.add_argument("--teacache-rescale", nargs="+", choices=sorted(RESCALES), default=["flux", "identity"],
                        help="TeaCache rescaling: FLUX.1's fitted polynomial and/or the identity")
    add_sampling_arguments(parser, steps=28)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(describe_machine())
    print(f"model {args.model}, {args.steps} steps, {args.dtype}; PSNR over {args.num_prompts} prompts x seeds "
          f"{args.seeds} against the uncached images; eval: {args.eval}")
    rows = measure(args)
    print(format_rows(rows))
    write_json(args.json, {"machine": describe_machine(), "args": vars(args), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
