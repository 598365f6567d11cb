"""`fluxkit convert`: rewrite a checkpoint in another layout (BFL single file <-> diffusers folder)."""

from __future__ import annotations

from .loading import add_convert_arguments as add_parser  # noqa: F401  (cli.py's add_parser/run convention)
from .loading import run_convert as run  # noqa: F401
