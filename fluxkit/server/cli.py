"""`fluxkit serve`: run the HTTP image service (OpenAI/Replicate-style APIs and a web UI) with uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="a TOML file (see docs/serving.md); flags override it")
    p.add_argument(
        "--model",
        action="append",
        metavar="[NAME=]SOURCE",
        help="serve SOURCE (built-in name, folder or Hub repo id) as NAME, e.g. "
        "black-forest-labs/flux-schnell=fluxkit-tiny-schnell; repeatable; the first is the default "
        "(default: the built-in fluxkit-tiny-schnell)",
    )
    p.add_argument("--host", help="address to bind (default 127.0.0.1; any other needs FLUXKIT_API_TOKEN)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--db", dest="database", type=Path, help="SQLite job store (default serve/jobs.sqlite)")
    p.add_argument("--outputs", type=Path, help="folder for generated images (default serve/outputs)")
    p.add_argument("--lora-dir", type=Path, help="folder of LoRA files that requests may name")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", help="auto, bf16, fp16, fp32")
    p.add_argument("--max-batch", type=int, help="images per batch (default 4)")
    p.add_argument("--batch-wait-ms", type=float, help="how long a batch waits for compatible requests (default 10)")
    p.add_argument("--max-queue", type=int, help="jobs allowed to wait (default 64); more get HTTP 429")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(run=run)


def config_from_args(args):
    from .config import load_config, parse_model_arg

    models = [parse_model_arg(m) for m in args.model or ()]
    if not models and args.config is None:
        from ..hub import DEFAULT_MODEL, available_builtins

        if DEFAULT_MODEL not in available_builtins():
            raise ValueError("no model to serve: pass --model NAME=SOURCE or --config FILE")
        models = [parse_model_arg(DEFAULT_MODEL)]
    limits = {"max_queue": args.max_queue} if args.max_queue is not None else None
    return load_config(
        args.config, models=models or None, host=args.host, port=args.port, database=args.database,
        outputs=args.outputs, lora_dir=args.lora_dir, device=args.device, dtype=args.dtype,
        max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, limits=limits,
    )


def run(args) -> int:
    try:
        import uvicorn

        from .app import create_app
    except ModuleNotFoundError as e:
        raise ValueError(
            f"fluxkit serve needs the serve extra ({e.name} is missing): pip install 'fluxkit[serve]'"
        ) from None
    from .engine import Engine

    config = config_from_args(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Load before the server starts, so that a bad model is a one-line error (exit 2), not a failed start-up.
    engines = {m.name: Engine.load(m, config.device, config.dtype, config.lora_dir) for m in config.models}
    names = ", ".join(engines)
    print(f"fluxkit serve: {names} on http://{config.host}:{config.port} (UI at /, API under /v1)", file=sys.stderr)
    uvicorn.run(create_app(config, engines), host=config.host, port=config.port, log_level=args.log_level)
    return 0
