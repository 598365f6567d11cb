"""Saving images with their generation parameters embedded, atomically; reading those parameters back."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, PngImagePlugin

from .atomic import atomic_write

FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
META_KEY = "fluxkit"
EXIF_DESCRIPTION = 0x010E  # ImageDescription: survives in JPEG and WebP EXIF


def save_image(
    image: Image.Image, path: str | Path, params: dict | None = None, fmt: str | None = None, quality: int = 95
) -> Path:
    """Write `image` to `path` (temp file + rename, so a crash never leaves half a file) with `params` as JSON."""
    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".") or "png").lower()
    if fmt not in FORMATS:
        raise ValueError(f"unsupported image format {fmt!r}; choose png, jpg or webp")
    text = json.dumps(params or {}, sort_keys=True)
    kwargs: dict = {}
    if FORMATS[fmt] == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text(META_KEY, text)
        kwargs["pnginfo"] = info
    else:
        exif = Image.Exif()
        exif[EXIF_DESCRIPTION] = f"{META_KEY}:{text}"
        kwargs.update(exif=exif.tobytes(), quality=quality)
    atomic_write(path, lambda tmp: image.save(tmp, format=FORMATS[fmt], **kwargs))
    return path


def read_params(path: str | Path) -> dict:
    """The parameters `save_image` embedded; ValueError if the file carries none."""
    try:
        img = Image.open(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    with img:
        text = img.info.get(META_KEY)
        if text is None:
            desc = img.getexif().get(EXIF_DESCRIPTION, "")
            if isinstance(desc, str) and desc.startswith(f"{META_KEY}:"):
                text = desc[len(META_KEY) + 1 :]
    if not text:
        raise ValueError(f"{path} carries no fluxkit generation parameters")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt fluxkit parameters ({e})") from None
