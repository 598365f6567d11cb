"""`fluxkit` command line: a thin adapter over the library (parse -> load -> call -> save).

Bad input prints one line and exits with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

# name -> (module with add_parser(subparsers) and run(args), one-line help); imported only when used.
COMMANDS = {
    "generate": ("fluxkit.cli_generate", "generate images from text"),
    "convert": ("fluxkit.cli_convert", "convert checkpoints between BFL, diffusers and GGUF layouts"),
    "eval": ("fluxkit.eval.cli", "score a model's prompt following on the built-in evaluation suite"),
    "train": ("fluxkit.train.cli", "train the tiny Flux family from a config file"),
    "train-lora": ("fluxkit.lora_train", "train a LoRA adapter on a folder of captioned images"),
    "serve": ("fluxkit.server.cli", "run the HTTP image service (OpenAI/Replicate-style APIs and a web UI)"),
}


class UsageError(ValueError):
    """Raised by commands for bad input; reported as one line with exit status 2."""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fluxkit", description="FLUX.1 text-to-image: generate, train, convert, serve."
    )
    parser.add_argument("--version", action="version", version=f"fluxkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_text, add_help=False)
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if not e.name or not e.name.startswith("fluxkit"):
                raise
            sub.add_parser(name, help=f"{help_text} (not available in this install)", add_help=False)
            continue
        mod.add_parser(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if not hasattr(args, "run"):
        print(f"fluxkit {args.command}: not available in this install", file=sys.stderr)
        return 2
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"fluxkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fluxkit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
