"""`fluxkit eval`: generate the evaluation suite with any model and sampler settings, and score it.

fluxkit eval --model fluxkit-tiny-dev --out runs/eval-dev
fluxkit eval --model fluxkit-tiny-schnell --steps 2 --quick
fluxkit eval --ground-truth            # the checker's ceiling on the generator's own renders
fluxkit eval --ground-truth --through-ae --model fluxkit-tiny-dev   # the ceiling its autoencoder sets
fluxkit eval --task fill --model runs/tiny-fill --out runs/eval-fill     # conditioned generation (issue #6)
fluxkit eval --task control --model runs/tiny-canny --baseline-model fluxkit-tiny-dev
fluxkit eval --task regional --model fluxkit-tiny-dev --baseline-model fluxkit-tiny-dev  # vs the global prompt alone
fluxkit eval --task edit --ground-truth
fluxkit eval --task fill --model fluxkit-tiny-fill --adapter-weight 0   # the variant's base, ignoring the condition
fluxkit eval --compare runs/eval-dev runs/eval-dev-q4   # paired: is B's pass rate different from A's, or noise?
fluxkit eval --probe --model fluxkit-tiny-dev   # which caption attributes the model reads (no sampling)
"""

from __future__ import annotations

import argparse
from pathlib import Path

TASKS = ("fill", "control", "edit", "regional")  # fluxkit.eval.tasks.TASKS, not imported here to keep --help fast
TASK_ITEMS, QUICK_ITEMS = 32, 8
PROBE_ITEMS, QUICK_PROBE_ITEMS = 64, 16  # fluxkit.eval.probe's, not imported here to keep --help fast


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="built-in name, folder or repo id (default: fluxkit-tiny-dev)")
    p.add_argument("--transformer", help="a single-file transformer replacing the model's own")
    p.add_argument("--ground-truth", action="store_true", help="score the scenes' own renders instead of a model")
    p.add_argument("--through-ae", action="store_true",
                   help="--ground-truth: round-trip the renders through --model's autoencoder (the ceiling it sets)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    p.add_argument("--guidance", type=float, help="distilled guidance (default: the model's)")
    p.add_argument("--mu", type=float, help="pin the schedule's shift to e^MU instead of the resolution rule (BFL's "
                   "mu; 0 is the unshifted schedule)")
    p.add_argument("--true-cfg", type=float, default=1.0, help="true CFG scale against the empty prompt (> 1 enables)")
    p.add_argument("--cache", help="step cache: fbcache:THRESHOLD or teacache:THRESHOLD")
    p.add_argument("--quantize", help="quantize the transformer (int8, fp8, q8_0, q4_0, ...)")
    p.add_argument("--adapter-weight", type=float, metavar="W",
                   help="scale the model's own adapters (a LoRA variant such as fluxkit-tiny-fill) by W; "
                        "0 measures its base without them")
    p.add_argument("--quick", action="store_true", help="4 prompts per category instead of the full suite")
    p.add_argument("--categories", nargs="+", metavar="CATEGORY",
                   help="run only these suite categories (position colour shape size count relation background "
                        "sign_word sign_random held_out; default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds per prompt")
    p.add_argument("--size", type=int, nargs=2, default=[128, 128], metavar=("WIDTH", "HEIGHT"))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", type=Path, help="folder for results.json and grid.png")
    p.add_argument("--task", choices=TASKS, help="score a conditioned-generation task instead of the suite")
    p.add_argument("--items", type=int, help=f"--task: items per seed (default {TASK_ITEMS}, {QUICK_ITEMS} with "
                   f"--quick); --probe: items per attribute (default {PROBE_ITEMS}, {QUICK_PROBE_ITEMS} with --quick)")
    p.add_argument("--probe", action="store_true",
                   help="caption probe: per attribute, does the model's denoising error prefer the true caption over "
                        "one with that attribute changed (chance 50%%); samples nothing; --guidance defaults to 1.0")
    p.add_argument("--probe-channel", choices=("both", "tokens", "pooled"), default="both",
                   help="--probe: give the model the counterfactual's token states and pooled vector (both), or only "
                        "its tokens, or only its pooled vector (the true caption's other half kept)")
    p.add_argument("--baseline-model", help="--task control|regional: a text-to-image model run without the control "
                   "image / the region prompts (global prompt alone)")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"),
                   help="compare two finished runs (their --out folders or results.json) item by item: pass rates, "
                        "paired difference B - A with a 95%% interval, McNemar's exact p; generates nothing")
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


def autoencode(pipe):
    """A batch of PIL images -> the same images encoded (posterior mean) and decoded by `pipe`'s autoencoder."""
    import torch

    from ..conditioning import to_pixels

    def roundtrip(images):
        pixels = to_pixels(images, None, "image", multiple=pipe.vae.params.downscale)
        with torch.inference_mode(), pipe._placed("vae"):
            weight = next(pipe.vae.parameters())
            z = pipe.vae.encode(pixels.to(weight.device, weight.dtype))
        return pipe.decode(z)

    return roundtrip


def _load(args, name: str, transformer=None):
    import torch

    from ..devices import default_device, parse_dtype
    from ..pipeline import FluxPipeline

    device = default_device() if args.device == "auto" else torch.device(args.device)
    dtype = None if args.dtype == "auto" else parse_dtype(args.dtype)
    return FluxPipeline.from_pretrained(
        name, torch_dtype=dtype, device=device, transformer=transformer, quantize=args.quantize
    )


def _model_under_test(args):
    """The evaluated pipeline (--model, --transformer, --quantize) with the --cache step cache on, if asked."""
    pipe = _load(args, args.model or "fluxkit-tiny-dev", args.transformer)
    if args.adapter_weight is not None:
        active = pipe.get_active_adapters()
        if not active:
            raise ValueError(f"--adapter-weight: {args.model or 'fluxkit-tiny-dev'} has no adapter (it applies to LoRA "
                             "variants such as fluxkit-tiny-fill)")
        pipe.set_adapters(active, adapter_weights=[args.adapter_weight] * len(active))
    if args.cache:
        pipe.transformer.enable_cache(parse_cache(args.cache))
    if args.mu is not None:
        pin_shift(pipe, args.mu)
    return pipe


def pin_shift(pipe, mu: float) -> None:
    """Sample `pipe` with the constant shift e^mu at every image size (a model with an unshifted schedule gets it
    too: pinning is an explicit choice)."""
    import math

    from ..pipeline import SchedulerConfig
    from ..sampling import ShiftConfig

    if not math.isfinite(mu):
        raise ValueError(f"--mu must be a finite number, got {mu}")
    pipe.scheduler = SchedulerConfig(use_dynamic_shifting=True, shift=ShiftConfig(base_shift=mu, max_shift=mu))


def run_task(args) -> int:
    """`--task`: build the task's items, generate them with the model (or score the ground truth), print a table."""
    from .task_run import run_task_eval, score_task_ground_truth
    from .tasks import build_task_items

    if args.true_cfg != 1.0:
        raise ValueError("--true-cfg is not supported with --task")
    if args.through_ae or args.categories:
        raise ValueError(f"{'--through-ae' if args.through_ae else '--categories'} applies to the suite, not to --task")
    if args.baseline_model and args.task not in ("control", "regional"):
        raise ValueError(f"--baseline-model applies to --task control or regional only, got --task {args.task}")
    n = args.items if args.items is not None else QUICK_ITEMS if args.quick else TASK_ITEMS
    items = build_task_items(args.task, n, seeds=tuple(args.seeds), size=tuple(args.size))
    if args.ground_truth:
        score_task_ground_truth(items, args.out)
        return 0
    pipe = _model_under_test(args)
    baseline = _load(args, args.baseline_model) if args.baseline_model else None
    run_task_eval(
        pipe,
        args.task,
        items,
        steps=args.steps,
        guidance=args.guidance,
        batch_size=args.batch_size,
        baseline=baseline,
        out=args.out,
    )
    return 0


def run_compare(args) -> int:
    from .compare import compare, format_comparison, load_results

    options = ("model", "transformer", "task", "quantize", "cache", "out", "steps", "guidance", "mu", "items",
               "baseline_model")
    given = [f"--{k.replace('_', '-')}" for k in options if getattr(args, k) is not None]
    given += [f"--{k.replace('_', '-')}" for k in ("ground_truth", "through_ae", "quick", "probe", "categories")
              if getattr(args, k)]
    if given:
        raise ValueError(f"--compare reads two finished runs and generates nothing; it takes no {', '.join(given)}")
    a, b = args.compare
    print(format_comparison(compare(load_results(a), load_results(b)), str(a), str(b)))
    return 0


def run_probe(args) -> int:
    from .probe import run_probe as probe

    given = [f"--{k.replace('_', '-')}" for k in ("task", "steps", "cache", "baseline_model", "categories")
             if getattr(args, k)]
    given += ["--mu"] * (args.mu is not None)
    given += ["--ground-truth"] * args.ground_truth + ["--through-ae"] * args.through_ae
    given += ["--true-cfg"] * (args.true_cfg != 1.0)
    if given:
        raise ValueError(f"--probe scores denoising errors and samples nothing; it takes no {', '.join(given)}")
    n = args.items if args.items is not None else QUICK_PROBE_ITEMS if args.quick else PROBE_ITEMS
    if n <= 0:
        raise ValueError(f"--items must be positive, got {n}")
    pipe = _model_under_test(args)
    probe(pipe, n, args.out, seed=args.seeds[0], size=tuple(args.size),
          guidance=1.0 if args.guidance is None else args.guidance, batch_size=args.batch_size,
          channel=args.probe_channel)
    return 0


def run(args) -> int:
    if args.compare is not None:
        return run_compare(args)
    if args.probe:
        return run_probe(args)
    if args.mu is not None and args.ground_truth:
        raise ValueError("--mu changes how a model samples; --ground-truth samples nothing")
    if args.probe_channel != "both":
        raise ValueError("--probe-channel needs --probe")
    if args.task is not None:
        return run_task(args)
    if args.items is not None or args.baseline_model is not None:
        raise ValueError("--items and --baseline-model need --task")
    from .run import run_eval, score_ground_truth
    from .suite import build_suite

    suite = build_suite(quick=args.quick, seeds=tuple(args.seeds), size=tuple(args.size),
                        **({"categories": tuple(args.categories)} if args.categories else {}))
    if args.ground_truth:
        transform = autoencode(_load(args, args.model or "fluxkit-tiny-dev")) if args.through_ae else None
        score_ground_truth(suite, args.out, transform=transform)
        return 0
    if args.through_ae:
        raise ValueError("--through-ae needs --ground-truth")
    pipe = _model_under_test(args)
    generate = make_generate(pipe, args.size[0], args.size[1], args.steps, args.guidance, args.true_cfg)
    summary = run_eval(generate, suite, args.out, batch_size=args.batch_size)
    if args.cache:
        stats = pipe.transformer.step_cache.stats()
        print(
            f"step cache: {stats['calls']} calls, {stats['skipped']} skipped "
            f"({stats['call_ratio']:.2f}x fewer full transformer calls)"
        )
        summary["overall"]["step_cache"] = stats
    return 0
