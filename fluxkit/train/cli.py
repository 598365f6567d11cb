"""`fluxkit train CONFIG`: run one stage of the tiny-family recipe; `fluxkit train --export RUN --out DIR` ships it.

    fluxkit train configs/tiny-base.toml --max-minutes 50        # stops cleanly with a checkpoint
    fluxkit train configs/tiny-base.toml --resume                 # continues exactly where it stopped
    torchrun --nproc_per_node=8 -m fluxkit train configs/tiny-base.toml   # DDP: gloo on CPU, NCCL on GPUs
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from .config import load_config


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", type=Path, help="stage config file (configs/tiny-{ae,cache,base,dev,schnell,"
                   "fill,canny,kontext,regional}.toml)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run from its latest checkpoint (starts it if it has none)")
    p.add_argument("--runs-dir", type=Path, help="where run folders live (default: $FLUXKIT_RUNS or ./runs)")
    p.add_argument("--max-minutes", type=float, help="time budget: stop with a checkpoint after this many minutes")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=2000 (repeatable)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: CUDA when present (each torchrun rank takes cuda:LOCAL_RANK)")
    p.add_argument("--threads", type=int, help="torch CPU threads per process (default: torch's choice)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--from-weights", type=Path, metavar="AE.safetensors",
                   help="ae stage only: finish the run from already-trained autoencoder weights (measures its "
                        "scale/shift and PSNR) instead of training one")
    p.add_argument("--export", type=Path, metavar="RUN",
                   help="instead of training: copy a finished transformer run's model to --out")
    p.add_argument("--checkpoint", metavar="STEP",
                   help="with --export: a checkpoint of a base/dev/schnell run, finished or not (a step number, or "
                        "'latest'), instead of its final export")
    p.add_argument("--weights", choices=("ema", "model"),
                   help="with --export --checkpoint: the checkpoint's EMA weights (default) or its raw weights")
    p.add_argument("--out", type=Path, help="with --export: the model folder to write")
    p.add_argument("--ae-path", default="ae.safetensors",
                   help="with --export: autoencoder path relative to --out (share one: ../ae.safetensors)")
    p.add_argument("--base", metavar="DIR",
                   help="with --export of a LoRA-mode variant run (fill/canny/kontext/regional): the base model folder "
                        "relative to --out (e.g. ../tiny-dev); --out then holds the LoRA and points at the base files")
    p.add_argument("--default-guidance", type=float, metavar="G",
                   help="with --export of a dev run: the folder's default guidance (default: the preset's, 3.5)")
    p.add_argument("--name", help="with --export: the model's spec name (and a LoRA variant's adapter name) in the "
                                  "folder; default: the preset's name, or a LoRA variant run's config name")
    p.set_defaults(run=run)


def runs_dir_from(args: argparse.Namespace) -> Path:
    return args.runs_dir or Path(os.environ.get("FLUXKIT_RUNS") or "runs")


def _step(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"--checkpoint takes a step number or 'latest', got {text!r}")
    return int(text)


def run(args: argparse.Namespace) -> int:
    if args.export is not None:
        from .flow import export_run

        if args.config is not None or args.out is None:
            raise ValueError("--export RUN needs --out DIR and no config file")
        if args.default_guidance is not None and (args.checkpoint is not None or args.base is not None):
            raise ValueError("--default-guidance applies to the export of a finished dev run (a LoRA variant takes its "
                             "base's), not with --checkpoint or --base")
        if args.weights is not None and args.checkpoint is None:
            raise ValueError("--weights picks a checkpoint's weights: use it with --checkpoint STEP")
        if args.checkpoint is not None:
            from .flow import export_checkpoint

            step = None if args.checkpoint == "latest" else _step(args.checkpoint)
            out = export_checkpoint(args.export, args.out, step, args.weights or "ema", args.name)
            print(f"wrote {out}")
        elif args.base is not None:
            from .variants import export_lora_variant

            print(f"wrote {export_lora_variant(args.export, args.out, args.base, args.name)}")
        else:
            print(f"wrote {export_run(args.export, args.out, args.ae_path, args.name, args.default_guidance)}")
        return 0
    if args.config is None:
        raise ValueError("a config file is required (e.g. configs/tiny-base.toml), or --export RUN --out DIR")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.set)
    from .loop import init_distributed, shutdown_distributed
    from .stages import run_stage

    dist = init_distributed(args.device)
    if args.from_weights is not None:
        from .ae import adopt_ae

        try:
            if cfg.stage != "ae":
                raise ValueError(f"--from-weights applies to the ae stage, not {cfg.stage!r}")
            run = adopt_ae(cfg, args.from_weights, runs_dir_from(args), dist)
        finally:
            shutdown_distributed(dist)
        print(f"{cfg.name}: finished from {args.from_weights}; outputs in {run.root}")
        return 0
    try:
        result = run_stage(cfg, runs_dir_from(args), resume=args.resume, max_minutes=args.max_minutes,
                           quiet=args.quiet, dist=dist)
    finally:
        shutdown_distributed(dist)
    if dist.is_main:
        where = result.run.root
        if result.finished:
            print(f"{cfg.name}: finished ({cfg.stage}); outputs in {where}")
        else:
            step = f" at step {result.step}/{cfg.train.steps}" if result.step is not None else ""
            print(f"{cfg.name}: stopped{step}; continue with: fluxkit train {args.config} --resume"
                  + (f" --runs-dir {args.runs_dir}" if args.runs_dir else ""))
    return 0
