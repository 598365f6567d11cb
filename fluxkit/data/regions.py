"""Regional-prompt scenes: the frame cut into regions, one object inside each, one one-object prompt per region.

What `fluxkit eval --task regional` scores (layouts "left/right", "top/bottom", "thirds") and what the regional
fine-tune (`fluxkit train configs/tiny-regional.toml`) learns from, with two more layouts ("rows", and "uneven":
two parts split at 35-65% of the width or height, drawn per scene) so the adapter learns regions, not three fixed
cuts. At most three regions: a scene holds at most three objects.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from .captions import object_phrase
from .scenes import (
    BACKGROUNDS,
    MARGIN,
    SIZE_THRESHOLD,
    SIZES,
    Scene,
    SceneObject,
    allowed_pairs,
    position_of,
    shape_half_extents,
)

EVAL_LAYOUTS = ("left/right", "top/bottom", "thirds")
LAYOUTS = (*EVAL_LAYOUTS, "rows", "uneven")
GLOBAL_PHRASES = ("an image with a {} background", "a {} background", "{} background", "objects on a {} background")

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1) px, x1 / y1 exclusive


class NoRoom(ValueError):
    """A layout does not suit this draw: a shape does not fit its region, or the background allows too few colours."""


@dataclass(frozen=True)
class RegionSpec:
    name: str  # "left", "top", "center", "top left", ...
    box: Box
    colour: str
    shape: str
    prompt: str  # the region's one-object prompt: "a red circle"

    def mask(self, width: int, height: int) -> np.ndarray:
        """(H, W) bool: True inside the box."""
        m = np.zeros((height, width), bool)
        m[self.box[1]:self.box[3], self.box[0]:self.box[2]] = True
        return m


def region_boxes(layout: str, width: int, height: int, rng: random.Random | None = None) -> dict[str, Box]:
    """Region name -> box. "uneven" draws its cut (and whether it is vertical) from `rng`."""
    w, h = width, height
    if layout == "left/right":
        return {"left": (0, 0, w // 2, h), "right": (w // 2, 0, w, h)}
    if layout == "top/bottom":
        return {"top": (0, 0, w, h // 2), "bottom": (0, h // 2, w, h)}
    if layout == "thirds":
        a, b = w // 3, 2 * w // 3
        return {"left": (0, 0, a, h), "center": (a, 0, b, h), "right": (b, 0, w, h)}
    if layout == "rows":
        a, b = h // 3, 2 * h // 3
        return {"top": (0, 0, w, a), "middle": (0, a, w, b), "bottom": (0, b, w, h)}
    if layout == "uneven":
        if rng is None:
            raise ValueError("layout 'uneven' draws its cut: pass rng")
        if rng.random() < 0.5:
            x = round(rng.uniform(0.35, 0.65) * w)
            return {"left": (0, 0, x, h), "right": (x, 0, w, h)}
        y = round(rng.uniform(0.35, 0.65) * h)
        return {"top": (0, 0, w, y), "bottom": (0, y, w, h)}
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def place_in(rng: random.Random, box: Box, shape: str, colour: str, width: int, height: int) -> SceneObject:
    """An object inside `box`: a large one, shrunk where the region is too narrow (to 85% of what fits). Small
    triangles and stars do not survive the tiny autoencoder's round trip well, so regions use the room they have.
    Raises NoRoom when not even a small object fits."""
    unit = min(width, height)
    hw1, hh1 = shape_half_extents(shape, 1.0)  # half extents per pixel of extent
    fits = min((box[2] - box[0] - 2 * MARGIN) / (2 * hw1), (box[3] - box[1] - 2 * MARGIN) / (2 * hh1))
    extent = min(rng.uniform(*SIZES["large"]) * unit, 0.85 * fits)
    if extent < SIZES["small"][0] * unit:
        raise NoRoom(f"a {shape} does not fit in region {box} of a {width}x{height} image")
    hw, hh = hw1 * extent, hh1 * extent
    x = rng.uniform(box[0] + hw + MARGIN, box[2] - hw - MARGIN)
    y = rng.uniform(box[1] + hh + MARGIN, box[3] - hh - MARGIN)
    size = "large" if extent >= SIZE_THRESHOLD * unit else "small"
    return SceneObject(shape, colour, size, (x, y), extent, position_of(x, y, width, height))


def regional_scene(rng: random.Random, layout: str, width: int, height: int,
                   pairs: str = "train") -> tuple[Scene, tuple[RegionSpec, ...], str]:
    """(scene, regions, global prompt): one object per region, each its own colour (no confusion between regions),
    colour x shape pairs from `pairs` ("train" keeps the held-out pairs out), global prompt naming the background."""
    boxes = region_boxes(layout, width, height, rng)
    background = rng.choice(tuple(BACKGROUNDS))
    allowed = allowed_pairs(pairs, background)
    colours = sorted({c for c, _ in allowed})
    if len(colours) < len(boxes):
        raise NoRoom(f"{len(boxes)} regions need {len(boxes)} colours; a {background} background allows {colours}")
    objects, regions = [], []
    for (name, box), colour in zip(boxes.items(), rng.sample(colours, len(boxes)), strict=True):
        shape = rng.choice([s for c, s in allowed if c == colour])
        obj = place_in(rng, box, shape, colour, width, height)
        objects.append(obj)
        regions.append(RegionSpec(name, box, colour, shape, object_phrase(obj, rng, with_size=False)))
    # A "count" Scene only as a container to render from: regional checks read the regions, not the kind.
    scene = Scene("count", width, height, background, frozenset({"count", "colour", "shape"}), tuple(objects))
    return scene, tuple(regions), background


def region_map(regions: tuple[RegionSpec, ...], width: int, height: int) -> np.ndarray:
    """(H, W, 3) uint8 picture of the layout: mid grey, each region tinted halfway to its object's colour."""
    from .scenes import COLOURS

    out = np.full((height, width, 3), 128, np.uint8)
    for r in regions:
        out[r.mask(width, height)] = (np.asarray(COLOURS[r.colour]) + 128) // 2
    return out
