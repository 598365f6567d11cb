"""Writing a file atomically: fill a temp file beside it, then rename, so no reader ever sees half a file.

The temp file is `.NAME.<random>.tmp` in the same folder (a rename is only atomic within one file system); the
server's start-up sweep removes such leftovers of a killed process. Standard library only: imported by light modules.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call `write(tmp)` to fill a temp file beside `path`, then rename it over `path` (parent folders created).

    The file gets the permissions a plain `open()` would give it (0o666 less the umask), not mkstemp's 0o600. If
    `write` raises, the temp file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file` through `atomic_write` (safetensors imported only when called)."""
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _umask() -> int:
    """The process umask. Linux shows it in /proc; elsewhere it can only be read by setting it, which briefly applies
    to files other threads create, so the value set meanwhile is the strict 0o077, never 0."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask
