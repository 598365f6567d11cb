"""Rendering a `Scene` to pixels: anti-aliased layers (objects, sign board, letters) alpha-composited over the
background, with a mask per layer and the region-boundary edge map (the Canny/control stages' exact edges)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from fluxkit.data.scenes import (
    BACKGROUNDS,
    COLOURS,
    PALETTE,
    SUPERSAMPLE,
    TRACKING,
    Scene,
    SceneObject,
    Sign,
    shape_half_extents,
    text_font,
    text_stroke,
)


@dataclass(frozen=True)
class RenderResult:
    image: np.ndarray  # (H, W, 3) uint8
    masks: list[np.ndarray]  # one (H, W) bool per scene object, same order: pixels >= 50% covered
    board_mask: np.ndarray | None = None  # (H, W) bool sign board (letters included), sign scenes only
    text_mask: np.ndarray | None = None  # (H, W) bool sign letters

    def edges(self) -> np.ndarray:
        """(H, W) bool: pixels whose region label (background / object i / board / letters) differs from a
        4-neighbour's."""
        label = np.zeros(self.image.shape[:2], np.int32)  # (H, W)
        layers = [*self.masks, *(m for m in (self.board_mask, self.text_mask) if m is not None)]
        for i, mask in enumerate(layers, start=1):
            label[mask] = i
        edge = np.zeros_like(label, dtype=bool)
        edge[:, 1:] |= label[:, 1:] != label[:, :-1]
        edge[:, :-1] |= label[:, 1:] != label[:, :-1]
        edge[1:, :] |= label[1:, :] != label[:-1, :]
        edge[:-1, :] |= label[1:, :] != label[:-1, :]
        return edge


def _shape_points(shape: str, cx: float, cy: float, extent: float) -> list[tuple[float, float]]:
    hw, hh = shape_half_extents(shape, extent)
    if shape == "triangle":  # apex up
        return [(cx, cy - hh), (cx + hw, cy + hh), (cx - hw, cy + hh)]
    if shape == "star":  # 5 points, apex up; inner radius 0.45 R keeps the arms thick enough to survive blur
        outer = hw / math.sin(2 * math.pi / 5)
        top = cy - hh  # shift so the bbox (not the circumcentre) sits at the centre
        pts = []
        for k in range(10):
            r, a = (outer, outer * 0.45)[k % 2], math.pi * k / 5
            pts.append((cx + r * math.sin(a), top + outer - r * math.cos(a)))
        return pts
    return [(cx - hw, cy - hh), (cx + hw, cy - hh), (cx + hw, cy + hh), (cx - hw, cy + hh)]


def _coverage(box: tuple[float, float, float, float], draw_fn, width: int, height: int):
    """Anti-aliased coverage of what `draw_fn(draw, to_canvas)` paints inside `box`: (alpha (h, w) float32 in
    [0, 1], x0, y0). Only the box is drawn (at SUPERSAMPLE x), which keeps rendering fast."""
    x0, y0 = max(0, math.floor(box[0]) - 1), max(0, math.floor(box[1]) - 1)
    x1, y1 = min(width, math.ceil(box[2]) + 1), min(height, math.ceil(box[3]) + 1)
    s = SUPERSAMPLE
    canvas = Image.new("L", ((x1 - x0) * s, (y1 - y0) * s), 0)

    def to_canvas(x: float, y: float) -> tuple[float, float]:
        return ((x - x0) * s, (y - y0) * s)

    draw_fn(ImageDraw.Draw(canvas), to_canvas)
    alpha = np.asarray(canvas.reduce(s), dtype=np.float32) / 255.0  # (h, w) box-filtered coverage
    return alpha, x0, y0


def _object_coverage(obj: SceneObject, width: int, height: int):
    def draw_fn(draw, to_canvas):
        if obj.shape == "circle":
            x0, y0, x1, y1 = obj.bbox
            draw.ellipse([*to_canvas(x0, y0), *to_canvas(x1, y1)], fill=255)
        else:
            draw.polygon([to_canvas(*p) for p in _shape_points(obj.shape, *obj.centre, obj.extent)], fill=255)
    return _coverage(obj.bbox, draw_fn, width, height)


def _text_coverage(sign: Sign, width: int, height: int):
    px = round(sign.font_px * SUPERSAMPLE)
    font, stroke, gap = text_font(px), text_stroke(px), TRACKING * px

    def draw_fn(draw, to_canvas):
        advances = [font.getlength(ch) for ch in sign.text]
        _, top, _, bottom = font.getbbox(sign.text, stroke_width=stroke)
        cx, cy = to_canvas((sign.bbox[0] + sign.bbox[2]) / 2, (sign.bbox[1] + sign.bbox[3]) / 2)
        x, y = cx - (sum(advances) + gap * (len(advances) - 1)) / 2, cy - (top + bottom) / 2
        for ch, advance in zip(sign.text, advances, strict=True):  # letter by letter: tracking keeps glyphs apart
            draw.text((x, y), ch, font=font, fill=255, stroke_width=stroke, stroke_fill=255)
            x += advance + gap
    return _coverage(sign.bbox, draw_fn, width, height)


def render(scene: Scene) -> RenderResult:
    """Pixels and masks of a scene. Layers are alpha-composited from their anti-aliased coverage."""
    image = np.empty((scene.height, scene.width, 3), np.float32)  # (H, W, 3)
    image[:] = BACKGROUNDS[scene.background]
    layers = [(_object_coverage(o, scene.width, scene.height), COLOURS[o.colour]) for o in scene.objects]
    if scene.sign is not None:
        board = scene.sign.bbox
        layers.append((_coverage(board, lambda d, tc: d.rectangle([*tc(*board[:2]), *tc(*board[2:])], fill=255),
                                 scene.width, scene.height), PALETTE[scene.sign.board]))
        layers.append((_text_coverage(scene.sign, scene.width, scene.height), PALETTE[scene.sign.ink]))
    masks = []
    for (alpha, x0, y0), rgb in layers:
        h, w = alpha.shape
        region = image[y0:y0 + h, x0:x0 + w]  # (h, w, 3) view
        region += (np.asarray(rgb, np.float32) - region) * alpha[..., None]
        mask = np.zeros((scene.height, scene.width), bool)
        mask[y0:y0 + h, x0:x0 + w] = alpha >= 0.5
        masks.append(mask)
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    if scene.sign is None:
        return RenderResult(pixels, masks)
    return RenderResult(pixels, masks[:-2], board_mask=masks[-2], text_mask=masks[-1])
