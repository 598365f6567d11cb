"""Deterministic pass/fail checks of an image against the structured `Scene` it was asked to show.

Pipeline: every pixel takes its nearest PALETTE colour (or none when far from all); the background is the most
common colour on the border; each other colour's connected components become blobs, dropping tiny ones and thin
anti-aliasing rims (blobs with almost no interior); a blob's shape comes from two scale-free features, fill
(area / bbox area) and solidity (area / convex-hull area). Each attribute in `scene.stated` is then one check.
Sign text is read by tesseract (`fluxkit.eval.ocr`) on the board's crop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.measure import label, regionprops

from fluxkit.data.scenes import PALETTE, SIZE_THRESHOLD, WORDS, Scene, position_of
from fluxkit.eval.ocr import char_accuracy, read_line

PALETTE_NAMES = tuple(PALETTE)
PALETTE_RGB = np.array([PALETTE[n] for n in PALETTE_NAMES], np.float32)  # (P, 3)
MAX_COLOUR_DISTANCE = 120.0  # RGB distance beyond which a pixel is no palette colour at all
MIN_AREA_FRACTION = 0.002  # blobs smaller than this share of the image are noise
MIN_CORE_FRACTION = 0.2  # blobs whose eroded interior is smaller than this share of them are edge rims


@dataclass(frozen=True)
class Blob:
    colour: str
    shape: str
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1), x1/y1 exclusive
    area: int
    fill: float  # area / bbox area (holes filled)
    solidity: float  # area / convex-hull area

    @property
    def centre(self) -> tuple[float, float]:
        return ((self.bbox[0] + self.bbox[2]) / 2, (self.bbox[1] + self.bbox[3]) / 2)

    def extent(self, width: int, height: int) -> float:
        """Long bbox side as a fraction of min(width, height), the unit SIZES uses."""
        return max(self.bbox[2] - self.bbox[0], self.bbox[3] - self.bbox[1]) / min(width, height)


@dataclass(frozen=True)
class Segmentation:
    background: str
    blobs: list[Blob]  # largest first
    width: int
    height: int


@dataclass(frozen=True)
class CheckResult:
    checks: dict[str, bool]  # one entry per stated attribute
    text_read: str | None = None  # sign scenes: what OCR read
    char_accuracy: float | None = None  # sign scenes
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(self.checks.values())


def classify_shape(fill: float, solidity: float) -> str:
    """Shape from scale-free features. Ideal values: star fill 0.38 / solidity 0.56, triangle 0.5 / 1.0,
    circle pi/4 = 0.785 / 1.0, square 1.0 / 1.0; thresholds sit between them."""
    if solidity < 0.8:
        return "star"
    if fill >= 0.89:
        return "square"
    return "circle" if fill >= 0.65 else "triangle"


def nearest_colours(image: np.ndarray) -> np.ndarray:
    """(H, W) int palette index of each pixel's nearest PALETTE colour, -1 where none is within reach."""
    pixels = image.astype(np.float32)  # (H, W, 3)
    dist2 = ((pixels[:, :, None, :] - PALETTE_RGB) ** 2).sum(-1)  # (H, W, P)
    index = dist2.argmin(-1)  # (H, W)
    index[np.take_along_axis(dist2, index[..., None], -1)[..., 0] > MAX_COLOUR_DISTANCE**2] = -1
    return index


def _blobs_of(mask: np.ndarray, colour: str, min_area: float) -> list[Blob]:
    components = label(mask, connectivity=1)  # (H, W) int
    area = np.bincount(components.ravel())
    core = np.bincount(components[ndimage.binary_erosion(mask)], minlength=len(area))
    blobs = []
    for region in regionprops(components):
        n = region.label
        if area[n] < min_area or core[n] < MIN_CORE_FRACTION * area[n]:
            continue
        filled = ndimage.binary_fill_holes(region.image)  # a board's letters are holes in it
        y0, x0, y1, x1 = region.bbox
        filled_area = int(filled.sum())
        hull_area = float(region.area_convex)  # the hull already spans any holes
        blobs.append(Blob(colour, classify_shape(filled_area / filled.size, filled_area / hull_area),
                          (x0, y0, x1, y1), filled_area, filled_area / filled.size, filled_area / hull_area))
    return blobs


def segment(image: np.ndarray) -> Segmentation:
    """Background colour and the blobs of every other palette colour in an (H, W, 3) uint8 image."""
    height, width = image.shape[:2]
    index = nearest_colours(image)  # (H, W)
    border = np.concatenate([index[0], index[-1], index[:, 0], index[:, -1]])
    border = border[border >= 0]
    votes = np.bincount(border if border.size else index[index >= 0].ravel(), minlength=len(PALETTE_NAMES))
    background = int(votes.argmax())
    min_area = max(12.0, MIN_AREA_FRACTION * width * height)
    blobs = []
    for colour in np.unique(index):
        if colour < 0 or colour == background:
            continue
        blobs += _blobs_of(index == colour, PALETTE_NAMES[colour], min_area)
    blobs.sort(key=lambda b: -b.area)
    return Segmentation(PALETTE_NAMES[background], blobs, width, height)


def _size_of(blob: Blob, seg: Segmentation) -> str:
    return "large" if blob.extent(seg.width, seg.height) >= SIZE_THRESHOLD else "small"


def _find(seg: Segmentation, colour: str, shape: str | None = None) -> Blob | None:
    """Largest blob of `colour` (and `shape` if given)."""
    return next((b for b in seg.blobs if b.colour == colour and shape in (None, b.shape)), None)


def relation_between(a: Blob, b: Blob) -> str:
    """Relation of a to b along the axis where their centres differ most."""
    dx, dy = b.centre[0] - a.centre[0], b.centre[1] - a.centre[1]
    if abs(dy) >= abs(dx):
        return "above" if dy > 0 else "below"
    return "left of" if dx > 0 else "right of"


def _check_single(scene: Scene, seg: Segmentation) -> dict[str, bool]:
    obj = scene.objects[0]
    # The asked-for colour if present, else the largest blob: a wrong colour should not also fail shape/size.
    target = _find(seg, obj.colour) or (seg.blobs[0] if seg.blobs else None)
    if target is None:
        return dict.fromkeys(("colour", "shape", "size", "position"), False)
    return {"colour": target.colour == obj.colour, "shape": target.shape == obj.shape,
            "size": _size_of(target, seg) == obj.size,
            "position": position_of(*target.centre, seg.width, seg.height) == obj.position}


def _check_count(scene: Scene, seg: Segmentation) -> dict[str, bool]:
    obj = scene.objects[0]
    same = [b for b in seg.blobs if b.colour == obj.colour]
    return {"count": len(same) == len(scene.objects), "colour": bool(same),
            "shape": bool(same) and all(b.shape == obj.shape for b in same),
            "size": bool(same) and all(_size_of(b, seg) == obj.size for b in same)}


def _check_relation(scene: Scene, seg: Segmentation) -> dict[str, bool]:
    a, b = scene.objects
    found_a, found_b = _find(seg, a.colour, a.shape), _find(seg, b.colour, b.shape)
    return {"colour": _find(seg, a.colour) is not None and _find(seg, b.colour) is not None,
            "shape": found_a is not None and found_b is not None,
            "relation": found_a is not None and found_b is not None
            and relation_between(found_a, found_b) == scene.relation}


def _read_sign(image: np.ndarray, scene: Scene, seg: Segmentation) -> str:
    """OCR of the board: the largest blob of the board colour, else the largest blob, else the whole image."""
    board = _find(seg, scene.sign.board) or (seg.blobs[0] if seg.blobs else None)
    if board is None:
        return read_line(image)
    x0, y0, x1, y1 = board.bbox
    if x1 - x0 < 4 or y1 - y0 < 4:
        return ""
    return read_line(image[y0 + 1:y1 - 1, x0 + 1:x1 - 1])  # inset: drop mixed board/background edge pixels


def check(image: np.ndarray | Image.Image, scene: Scene) -> CheckResult:
    """Check `image` against every attribute `scene.stated` says the prompt asked for.

    A sign's text passes on an exact read; `char_accuracy` grades partial reads (used for random strings).
    """
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got shape {pixels.shape} dtype {pixels.dtype}")
    if pixels.shape[:2] != (scene.height, scene.width):
        raise ValueError(f"image is {pixels.shape[1]}x{pixels.shape[0]} but the scene is "
                         f"{scene.width}x{scene.height} (width x height)")
    seg = segment(pixels)
    checks: dict[str, bool] = {}
    text = accuracy = None
    if scene.kind == "single":
        checks = _check_single(scene, seg)
    elif scene.kind == "count":
        checks = _check_count(scene, seg)
    elif scene.kind == "relation":
        checks = _check_relation(scene, seg)
    else:
        text = _read_sign(pixels, scene, seg)
        accuracy = char_accuracy(scene.sign.text, text)
        checks = {"text": text == scene.sign.text}
    checks["background"] = seg.background == scene.background
    checks = {name: ok for name, ok in checks.items() if name in scene.stated}
    notes = {"background": seg.background, "blobs": ", ".join(f"{b.colour} {b.shape}" for b in seg.blobs[:6])}
    if scene.kind == "sign":
        notes["text_kind"] = "word" if scene.sign.text in WORDS else "random"
    return CheckResult(checks, text, accuracy, notes)
