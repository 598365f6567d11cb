"""Adherence tasks for conditioned generation (issue #6): Fill, Canny control, Kontext edits and regional prompts.

Each task is a deterministic list of `TaskItem`s (the inputs the pipeline gets and the outcome it should produce,
all derived from `fluxkit.data.scenes`) and one checker, `check_task(image, item)`, that scores a generated image:

- fill: one object's dilated bbox is masked out of the scene; the prompt is the scene's caption. Pass = a blob of
  the object's colour and shape has its centre inside the mask AND the pixels outside the mask are preserved.
- control: the scene's label edges (`RenderResult.edges()`, white on black) steer a generation from the caption.
  Score = IoU of the output's edges with the control edges, both dilated by EDGE_TOLERANCE px; pass = IoU >=
  MIN_EDGE_IOU. The output's edges come from `fluxkit.control.canny` on each RGB channel separately: the standard
  re-extraction measure for Canny control, independent of the palette (edges from the checker's colour
  segmentation would fail a right shape in a slightly wrong colour), and per channel because a grey conversion
  loses some palette edges (yellow on light blue differ by 0.3 grey levels).
- edit: a Kontext instruction (recolour, remove or move one object). Pass = the after state holds at the changed
  object's place (new colour found and old one gone; object gone; object at its new place and not its old one)
  AND the pixels outside the changed objects' dilated masks are preserved.
- regional: two or three regions, each with a one-object prompt, plus a global prompt naming the background.
  Pass = each region holds its object (colour and shape, blob centre inside the region) AND no region holds
  another region's object. Metrics: regions_held (share of regions holding their object) and colours_held (share
  holding a blob of their object's colour, any shape: placement apart from drawing the shape).

"Preserved" means a mean absolute difference (RGB, 0-255) from the source image of at most MAX_OUTSIDE_MAE.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image
from scipy import ndimage

from fluxkit.data.captions import caption
from fluxkit.data.regions import EVAL_LAYOUTS, RegionSpec, regional_scene
from fluxkit.data.render import render
from fluxkit.data.scenes import (
    KINDS,
    Scene,
    SceneObject,
    edit_move,
    edit_recolor,
    edit_remove,
    position_of,
    sample_scene,
)
from fluxkit.eval.checker import Segmentation, segment

TASKS = ("fill", "control", "edit", "regional")
TASK_KINDS = {  # task -> the sub-kinds its items cycle through (the rows of its report)
    "fill": ("single", "count", "relation"),
    "control": KINDS,
    "edit": ("recolor", "remove", "move"),
    "regional": EVAL_LAYOUTS,
}
FILL_PAD = 4  # px the fill mask extends past the object's bbox: its anti-aliased rim plus a little context
CHANGE_PAD = 3  # px the edit's change mask extends past the changed objects' masks (anti-aliased rims)
LOCATE_PAD = 3  # px of slack when asking whether a blob's centre lies inside an object's bbox
MAX_OUTSIDE_MAE = 8.0  # mean |output - source| outside the mask, 0-255: the tiny AE's round trip costs 0.7 (max 1.8)
EDGE_TOLERANCE = 1  # px: both edge maps are dilated by a (2r+1)^2 square before the IoU
MIN_EDGE_IOU = 0.5  # true renders score 0.71-0.94 (thin Canny lines vs 2 px label edges), others' images <= 0.25


@dataclass(frozen=True)
class Region(RegionSpec):
    def holds(self, blob) -> bool:
        return self.box[0] <= blob.centre[0] < self.box[2] and self.box[1] <= blob.centre[1] < self.box[3]


@dataclass(frozen=True, eq=False)
class TaskItem:
    id: str
    task: str
    kind: str  # one of TASK_KINDS[task]
    prompt: str  # caption (fill, control), instruction (edit), global prompt (regional)
    seed: int  # generation seed
    expected: Scene  # what the output should show
    before: Scene | None = None  # edit: the scene the instruction applies to
    index: int | None = None  # fill: the masked object; edit: the edited object (in before.objects)
    source: np.ndarray | None = None  # (H, W, 3) uint8: fill/edit pixels to keep outside `mask`
    condition: np.ndarray | None = None  # (H, W, 3) uint8: masked image (fill), edges (control), before (edit)
    mask: np.ndarray | None = None  # (H, W) bool: fill region to regenerate; edit region allowed to change
    regions: tuple[Region, ...] = ()  # regional only


@dataclass(frozen=True)
class TaskResult:
    checks: dict[str, bool]
    metrics: dict[str, float]

    @property
    def passed(self) -> bool:
        return all(self.checks.values())


# ------------------------------------------------------------------------------------------------------------ items
def _fill(rng: random.Random, kind: str, width: int, height: int) -> dict:
    scene = sample_scene(rng, width, height, (kind,))
    index = rng.randrange(len(scene.objects))
    x0, y0, x1, y1 = scene.objects[index].bbox
    mask = np.zeros((height, width), bool)  # (H, W)
    mask[max(0, math.floor(y0) - FILL_PAD):math.ceil(y1) + FILL_PAD,
         max(0, math.floor(x0) - FILL_PAD):math.ceil(x1) + FILL_PAD] = True
    source = render(scene).image
    masked = source.copy()
    masked[mask] = 128  # mid grey: what Fill turns every masked pixel into (0 in [-1, 1])
    return dict(prompt=caption(scene, rng), expected=scene, index=index, source=source, condition=masked, mask=mask)


def _control(rng: random.Random, kind: str, width: int, height: int) -> dict:
    scene = sample_scene(rng, width, height, (kind,))
    edges = render(scene).edges()  # (H, W) bool
    picture = np.repeat(edges[..., None], 3, axis=-1).astype(np.uint8) * 255  # (H, W, 3) white edges on black
    return dict(prompt=caption(scene, rng), expected=scene, condition=picture)


def _changed(before: Scene, after: Scene, kind: str, index: int) -> list[tuple[SceneObject | None, ...]]:
    """(before object, after object) pairs the edit changes; None where the object does not exist."""
    if kind == "remove":
        return [(before.objects[index], None)]
    if kind == "recolor" and before.kind == "count":  # all identical objects change colour together
        return list(zip(before.objects, after.objects, strict=True))
    return [(before.objects[index], after.objects[index])]


def change_mask(before: Scene, after: Scene, kind: str, index: int) -> np.ndarray:
    """(H, W) bool: the pixels an edit may change, the changed objects' masks before and after, dilated."""
    old_render, new_render = render(before), render(after)
    mask = np.zeros((before.height, before.width), bool)  # (H, W)
    for old, new in _changed(before, after, kind, index):
        mask |= old_render.masks[before.objects.index(old)]
        if new is not None:
            mask |= new_render.masks[after.objects.index(new)]
    return ndimage.binary_dilation(mask, np.ones((2 * CHANGE_PAD + 1,) * 2, bool))


def _edit(rng: random.Random, kind: str, width: int, height: int) -> dict:
    edit = {"recolor": edit_recolor, "remove": edit_remove, "move": edit_move}[kind]
    kinds = ("relation", "count") if kind == "remove" else ("single", "count", "relation")
    for _ in range(100):  # redraw scenes the edit cannot apply to (one object to remove, no free colour, ...)
        before = sample_scene(rng, width, height, kinds)
        index = rng.randrange(len(before.objects))
        try:
            after, instruction = edit(before, rng, index)
        except ValueError:
            continue
        source = render(before).image
        return dict(prompt=instruction, expected=after, before=before, index=index, source=source,
                    condition=source, mask=change_mask(before, after, kind, index))
    raise ValueError(f"cannot draw a {width}x{height} scene for a {kind!r} edit")


def _regional(rng: random.Random, layout: str, width: int, height: int) -> dict:
    scene, specs, background = regional_scene(rng, layout, width, height)
    regions = tuple(Region(r.name, r.box, r.colour, r.shape, r.prompt) for r in specs)
    return dict(prompt=f"an image with a {background} background", expected=scene, regions=regions)


def build_task_items(task: str, n: int = 32, seeds: tuple[int, ...] = (0,), size: tuple[int, int] = (128, 128),
                     suite_seed: int = 0) -> list[TaskItem]:
    """`n` items of `task`, cycling through TASK_KINDS[task], each once per generation seed. Deterministic:
    item k depends only on (task, suite_seed, size, k)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not seeds:
        raise ValueError("seeds must name at least one generation seed")
    width, height = size
    if width % 16 or height % 16 or width <= 0 or height <= 0:
        raise ValueError(f"size must be (width, height) positive multiples of 16, got {size}")
    make = {"fill": _fill, "control": _control, "edit": _edit, "regional": _regional}[task]
    items = []
    for k in range(n):
        kind = TASK_KINDS[task][k % len(TASK_KINDS[task])]
        fields = make(random.Random(f"fluxkit-tasks/{task}/{suite_seed}/{width}x{height}/{k}"), kind, width, height)
        items += [TaskItem(f"{task}-{k:03d}-s{seed}", task, kind, seed=seed, **fields) for seed in seeds]
    return items


# --------------------------------------------------------------------------------------------------------- checkers
def outside_mae(image: np.ndarray, source: np.ndarray, mask: np.ndarray) -> float:
    """Mean |image - source| over RGB and the pixels outside `mask`, on the 0-255 scale."""
    diff = np.abs(image.astype(np.float32) - source.astype(np.float32))  # (H, W, 3)
    return float(diff[~mask].mean()) if (~mask).any() else 0.0


def _blob_at(seg: Segmentation, obj: SceneObject, away: SceneObject | None = None) -> bool:
    """Whether a blob of obj's colour and shape is centred in obj's bbox (+ LOCATE_PAD) and, with `away`, nearer
    obj's centre than away's (a moved object's old and new bboxes may overlap)."""
    x0, y0, x1, y1 = obj.bbox
    for b in seg.blobs:
        if b.colour != obj.colour or b.shape != obj.shape:
            continue
        cx, cy = b.centre
        if not (x0 - LOCATE_PAD <= cx <= x1 + LOCATE_PAD and y0 - LOCATE_PAD <= cy <= y1 + LOCATE_PAD):
            continue
        if away is None or math.dist(b.centre, obj.centre) <= math.dist(b.centre, away.centre):
            return True
    return False


def output_edges(image: np.ndarray) -> np.ndarray:
    """(H, W) bool: Canny edges of each RGB channel, OR-ed, at fluxkit.control.canny's BFL thresholds (50, 200):
    every palette pair drawn together differs by >= 63 levels in some channel. (Thresholds 20/60 or 10/30 give
    the same IoUs on true renders, within 0.006.)"""
    from fluxkit.control import canny

    edges = [np.asarray(canny(Image.fromarray(np.ascontiguousarray(image[..., c]))))[..., 0] > 0 for c in range(3)]
    return edges[0] | edges[1] | edges[2]


def edge_iou(a: np.ndarray, b: np.ndarray, tolerance: int = EDGE_TOLERANCE) -> float:
    """IoU of two (H, W) bool edge maps, each dilated by a (2 * tolerance + 1)^2 square first (1.0 if both empty)."""
    if tolerance > 0:
        square = np.ones((2 * tolerance + 1,) * 2, bool)
        a, b = ndimage.binary_dilation(a, square), ndimage.binary_dilation(b, square)
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def _check_fill(image: np.ndarray, item: TaskItem) -> TaskResult:
    obj, seg = item.expected.objects[item.index], segment(image)
    h, w = item.mask.shape
    found = any(b.colour == obj.colour and b.shape == obj.shape
                and item.mask[min(int(b.centre[1]), h - 1), min(int(b.centre[0]), w - 1)] for b in seg.blobs)
    mae = outside_mae(image, item.source, item.mask)
    return TaskResult({"object": found, "preserved": mae <= MAX_OUTSIDE_MAE}, {"outside_mae": mae})


def _check_edit(image: np.ndarray, item: TaskItem) -> TaskResult:
    seg, done = segment(image), True
    for old, new in _changed(item.before, item.expected, item.kind, item.index):
        if item.kind == "remove":
            done &= not _blob_at(seg, old)
        elif item.kind == "recolor":
            done &= _blob_at(seg, new) and not _blob_at(seg, old)
        else:
            done &= _blob_at(seg, new, away=old) and not _blob_at(seg, old, away=new)
    mae = outside_mae(image, item.source, item.mask)
    return TaskResult({"edited": done, "preserved": mae <= MAX_OUTSIDE_MAE}, {"outside_mae": mae})


def _check_regional(image: np.ndarray, item: TaskItem) -> TaskResult:
    seg = segment(image)
    owned = [any(r.holds(b) and (b.colour, b.shape) == (r.colour, r.shape) for b in seg.blobs) for r in item.regions]
    objects = {(r.colour, r.shape) for r in item.regions}
    leaked = any(r.holds(b) and (b.colour, b.shape) in objects - {(r.colour, r.shape)}
                 for r in item.regions for b in seg.blobs)
    # Placement alone, apart from drawing the shape: a blob of the region's colour (any shape) centred in it.
    coloured = [any(r.holds(b) and b.colour == r.colour for b in seg.blobs) for r in item.regions]
    return TaskResult({"placed": all(owned), "no_leak": not leaked},
                      {"regions_held": float(np.mean(owned)), "colours_held": float(np.mean(coloured))})


def check_task(image: np.ndarray | Image.Image, item: TaskItem) -> TaskResult:
    """Score a generated image against `item` with its task's checker (see the module docstring)."""
    if not isinstance(item, TaskItem):
        raise ValueError(f"item must be a TaskItem, got {type(item).__name__}")
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got shape {pixels.shape} dtype {pixels.dtype}")
    scene = item.expected
    if pixels.shape[:2] != (scene.height, scene.width):
        raise ValueError(f"image is {pixels.shape[1]}x{pixels.shape[0]} but item {item.id} is "
                         f"{scene.width}x{scene.height} (width x height)")
    if item.task == "fill":
        return _check_fill(pixels, item)
    if item.task == "edit":
        return _check_edit(pixels, item)
    if item.task == "regional":
        return _check_regional(pixels, item)
    iou = edge_iou(output_edges(pixels), item.condition[..., 0] > 0)
    return TaskResult({"edges": iou >= MIN_EDGE_IOU}, {"edge_iou": iou})


def ground_truth(item: TaskItem) -> np.ndarray:
    """(H, W, 3) uint8: the generator's own render of the expected outcome (the checkers' ceiling)."""
    return render(item.expected).image


def swap_regions(item: TaskItem) -> Scene:
    """The expected scene with region k's object translated into region k+1 (a wrong layout, for validation)."""
    boxes = [r.box for r in item.regions]
    objects = []
    for k, obj in enumerate(item.expected.objects):
        src, dst = boxes[k], boxes[(k + 1) % len(boxes)]
        x, y = obj.centre[0] + dst[0] - src[0], obj.centre[1] + dst[1] - src[1]
        objects.append(replace(obj, centre=(x, y), position=position_of(x, y, item.expected.width,
                                                                        item.expected.height)))
    return replace(item.expected, objects=tuple(objects))
