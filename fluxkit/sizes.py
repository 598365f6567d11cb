"""Image sizes from an aspect ratio and an area, shared by `fluxkit generate` and `fluxkit serve`."""

from __future__ import annotations

ASPECT_RATIOS = ("1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3", "21:9", "9:21")


def size_for_aspect(aspect_ratio: str, area: float, multiple: int = 16) -> tuple[int, int]:
    """(height, width) of about `area` pixels in `aspect_ratio` ("W:H"), each a multiple of `multiple`."""
    if aspect_ratio not in ASPECT_RATIOS:
        raise ValueError(f"aspect_ratio must be one of {', '.join(ASPECT_RATIOS)}, got {aspect_ratio!r}")
    if not area > 0:
        raise ValueError(f"image area must be positive, got {area}")
    a, b = (int(v) for v in aspect_ratio.split(":"))
    width = max(multiple, round((area * a / b) ** 0.5 / multiple) * multiple)
    height = max(multiple, round((area * b / a) ** 0.5 / multiple) * multiple)
    return height, width
