"""Procedural scenes: the vocabulary, a structured description, layout, sampling and edits.

A `Scene` is plain data (background, objects, relation, sign, which attributes the caption states). The caption
(`fluxkit.data.captions`), the pixels (`fluxkit.data.render`) and the evaluation checks (`fluxkit.eval.checker`) are
all derived from it, so a caption never says something the image does not show. Edits (`edit_recolor`,
`edit_remove`, `edit_move`) return a new Scene plus an instruction, so before/after pairs render from the same
structure. `fluxkit.data.dataset.SceneDataset` draws, renders and captions scenes by index.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from functools import lru_cache

from PIL import ImageFont

from fluxkit.data.captions import move_instruction, recolor_instruction, remove_instruction

# Object colours: far apart in RGB so nearest-colour segmentation separates them (pairwise distance >= 90).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (250, 220, 20),
    "orange": (245, 130, 0), "purple": (130, 40, 170), "pink": (250, 120, 190), "white": (255, 255, 255),
    "black": (0, 0, 0),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128), "light blue": (185, 210, 245),
    "light yellow": (250, 245, 190), "light pink": (250, 210, 225), "light green": (200, 240, 195),
}
BOARD_COLOURS: dict[str, tuple[int, int, int]] = {"brown": (125, 75, 35)}  # sign boards only
PALETTE: dict[str, tuple[int, int, int]] = {**COLOURS, **BACKGROUNDS, **BOARD_COLOURS}  # every classifiable colour
BOARDS: tuple[tuple[str, str], ...] = (("white", "black"), ("brown", "white"), ("black", "yellow"), ("blue", "white"))
SHAPES = ("circle", "square", "triangle", "star")
SIZES: dict[str, tuple[float, float]] = {"small": (0.17, 0.22), "large": (0.34, 0.42)}  # long side / min(W, H)
SIZE_THRESHOLD = 0.28  # between the two ranges; the checker classifies size with it
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
RELATIONS = ("above", "below", "left of", "right of")
KINDS = ("single", "count", "relation", "sign")
STATABLE = {  # kind -> (attributes a caption always states, attributes it may state)
    "single": ({"colour", "shape"}, {"size", "position", "background"}),
    "count": ({"count", "colour", "shape"}, {"size", "background"}),
    "relation": ({"colour", "shape", "relation"}, {"background"}),
    "sign": ({"text"}, {"background"}),
}
WORDS = ("OPEN", "STOP", "EXIT", "SALE", "CAFE", "HOTEL", "BAR", "BANK", "TAXI", "PARK", "BUS", "SHOP", "FOOD",
         "GAS", "INN", "ZOO", "BOOK", "MILK", "FISH", "PIZZA", "HELLO", "LOVE", "HOME", "FREE", "WAIT", "PUSH",
         "PULL", "YES", "NO", "GO", "MENU", "BREAD")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
RANDOM_LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"  # licence-plate style: no I, O, Q, the letters misread out of context
HELD_OUT_PAIRS = frozenset({("purple", "star"), ("orange", "triangle"), ("pink", "square"), ("green", "circle")})
IMAGE_SIZES = ((128, 128), (160, 96), (96, 160))  # (width, height)
MIN_CONTRAST = 110.0  # RGB distance an object (or board) keeps from what it is drawn on
SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges
TRACKING = 0.12  # extra space between letters, in font sizes: tesseract misreads touching bold glyphs
MARGIN = 2.0  # pixels kept free around objects (frame edge and each other)
PAIR_MODES = ("train", "held_out", "any")


def contrasts(a: str, b: str) -> bool:
    """Whether colours `a` and `b` (PALETTE names) are far enough apart to draw one on the other."""
    return math.dist(PALETTE[a], PALETTE[b]) >= MIN_CONTRAST


def allowed_pairs(mode: str, background: str) -> list[tuple[str, str]]:
    """(colour, shape) pairs drawable on `background`: "train" excludes HELD_OUT_PAIRS, "held_out" is only them."""
    if mode not in PAIR_MODES:
        raise ValueError(f"pairs must be one of {PAIR_MODES}, got {mode!r}")
    pairs = [(c, s) for c in COLOURS for s in SHAPES if contrasts(c, background)]
    if mode == "train":
        return [p for p in pairs if p not in HELD_OUT_PAIRS]
    return [p for p in pairs if p in HELD_OUT_PAIRS] if mode == "held_out" else pairs


def position_of(x: float, y: float, width: int, height: int) -> str:
    """Name of the 3x3 grid cell holding point (x, y)."""
    col, row = min(int(3 * x / width), 2), min(int(3 * y / height), 2)
    return POSITIONS[3 * row + col]


def shape_half_extents(shape: str, extent: float) -> tuple[float, float]:
    """Half width and half height of a shape whose long side is `extent` pixels."""
    if shape == "triangle":
        return extent / 2, extent * math.sqrt(3) / 4  # equilateral
    if shape == "star":
        return extent / 2, extent * (1 + math.cos(math.pi / 5)) / (4 * math.sin(2 * math.pi / 5))
    return extent / 2, extent / 2


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str  # "small" | "large"
    centre: tuple[float, float]  # bbox centre, pixels (x, y)
    extent: float  # long side of the bbox, pixels
    position: str  # grid cell of the centre

    def __post_init__(self) -> None:
        for name, value, vocab in (("shape", self.shape, SHAPES), ("colour", self.colour, COLOURS),
                                   ("size", self.size, SIZES), ("position", self.position, POSITIONS)):
            if value not in vocab:
                raise ValueError(f"SceneObject {name} must be one of {tuple(vocab)}, got {value!r}")

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        hw, hh = shape_half_extents(self.shape, self.extent)
        return (self.centre[0] - hw, self.centre[1] - hh, self.centre[0] + hw, self.centre[1] + hh)


@dataclass(frozen=True)
class Sign:
    text: str
    board: str  # board colour (PALETTE name)
    ink: str  # letter colour
    bbox: tuple[float, float, float, float]  # board rectangle, pixels
    font_px: float  # font size in output pixels


@dataclass(frozen=True)
class Scene:
    kind: str
    width: int
    height: int
    background: str
    stated: frozenset[str]  # attributes the caption states, hence the checks that apply
    objects: tuple[SceneObject, ...] = ()
    relation: str | None = None  # objects[0] <relation> objects[1]
    sign: Sign | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Scene kind must be one of {KINDS}, got {self.kind!r}")
        if self.width % 16 or self.height % 16 or self.width <= 0 or self.height <= 0:
            raise ValueError(f"Scene size must be positive multiples of 16, got {self.width}x{self.height}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"Scene background must be one of {tuple(BACKGROUNDS)}, got {self.background!r}")
        required, optional = STATABLE[self.kind]
        if not required <= self.stated <= required | optional:
            raise ValueError(f"Scene stated {sorted(self.stated)} must hold {sorted(required)} and at most "
                             f"{sorted(optional)} for kind {self.kind!r}")
        if (self.kind == "relation") != (self.relation is not None) or self.relation not in (None, *RELATIONS):
            raise ValueError(f"relation {self.relation!r} does not fit kind {self.kind!r}")
        if (self.kind == "sign") != (self.sign is not None):
            raise ValueError(f"a sign is required exactly for kind 'sign', got kind {self.kind!r}")
        counts = {"single": (1, 1), "count": (1, 3), "relation": (2, 2), "sign": (0, 0)}[self.kind]
        if not counts[0] <= len(self.objects) <= counts[1]:
            raise ValueError(f"kind {self.kind!r} needs {counts} objects, got {len(self.objects)}")


# ---------------------------------------------------------------------------------------------------- construction
def _fits(box: tuple[float, float, float, float], width: int, height: int, others) -> bool:
    x0, y0, x1, y1 = box
    if x0 < MARGIN or y0 < MARGIN or x1 > width - MARGIN or y1 > height - MARGIN:
        return False
    return all(x1 + MARGIN <= o[0] or o[2] + MARGIN <= x0 or y1 + MARGIN <= o[1] or o[3] + MARGIN <= y0
               for o in others)


def make_object(rng: random.Random, width: int, height: int, shape: str, colour: str, size: str,
                position: str | None = None, avoid: tuple[SceneObject, ...] = (), tries: int = 100,
                extent: float | None = None) -> SceneObject:
    """Place one object; with `position` its centre lies well inside that grid cell (a 15% inset). `extent`
    (pixels) keeps a given object's exact size, e.g. when moving it."""
    for name, value, vocab in (("shape", shape, SHAPES), ("colour", colour, COLOURS), ("size", size, SIZES)):
        if value not in vocab:
            raise ValueError(f"{name} must be one of {tuple(vocab)}, got {value!r}")
    extent = rng.uniform(*SIZES[size]) * min(width, height) if extent is None else extent
    hw, hh = shape_half_extents(shape, extent)
    xs, ys = (0.0, float(width)), (0.0, float(height))
    if position is not None:
        if position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
        row, col = divmod(POSITIONS.index(position), 3)
        xs = (width * (col + 0.15) / 3, width * (col + 0.85) / 3)
        ys = (height * (row + 0.15) / 3, height * (row + 0.85) / 3)
    xs = (max(xs[0], hw + MARGIN), min(xs[1], width - hw - MARGIN))
    ys = (max(ys[0], hh + MARGIN), min(ys[1], height - hh - MARGIN))
    for _ in range(tries if xs[0] <= xs[1] and ys[0] <= ys[1] else 0):
        x, y = rng.uniform(*xs), rng.uniform(*ys)
        if _fits((x - hw, y - hh, x + hw, y + hh), width, height, [o.bbox for o in avoid]):
            return SceneObject(shape, colour, size, (x, y), extent, position_of(x, y, width, height))
    raise ValueError(f"cannot place a {size} {shape} at {position or 'any position'} in {width}x{height} "
                     f"beside {len(avoid)} objects")


def relation_of(a: SceneObject, b: SceneObject) -> str | None:
    """The relation of a to b when one axis clearly dominates (offset >= 2x the other), else None."""
    dx, dy = b.centre[0] - a.centre[0], b.centre[1] - a.centre[1]
    if abs(dy) >= 2 * abs(dx):
        return "above" if dy > 0 else "below"
    if abs(dx) >= 2 * abs(dy):
        return "left of" if dx > 0 else "right of"
    return None


def make_relation(rng: random.Random, width: int, height: int, a: tuple[str, str], b: tuple[str, str],
                  relation: str, size: str = "small", tries: int = 200) -> tuple[SceneObject, SceneObject]:
    """Two objects, `a` = (colour, shape) standing in `relation` to `b`, by rejection sampling."""
    if relation not in RELATIONS:
        raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")
    for _ in range(tries):
        first = make_object(rng, width, height, a[1], a[0], size)
        try:
            second = make_object(rng, width, height, b[1], b[0], size, avoid=(first,), tries=5)
        except ValueError:
            continue
        if relation_of(first, second) == relation:
            return first, second
    raise ValueError(f"cannot place {a} {relation} {b} at size {size!r} in {width}x{height}")


def make_count(rng: random.Random, width: int, height: int, colour: str, shape: str, n: int,
               size: str, tries: int = 50) -> tuple[SceneObject, ...]:
    """`n` identical (colour, shape, size) objects that do not touch."""
    if not 1 <= n <= 3:
        raise ValueError(f"n must be 1..3, got {n}")
    for _ in range(tries):
        placed: tuple[SceneObject, ...] = ()
        try:
            for _ in range(n):
                placed += (make_object(rng, width, height, shape, colour, size, avoid=placed, tries=20),)
            return placed
        except ValueError:
            continue
    raise ValueError(f"cannot place {n} {size} {shape}s in {width}x{height}")


def make_sign(rng: random.Random, width: int, height: int, text: str, background: str,
              board: tuple[str, str] | None = None) -> Sign:
    """A board with `text` in letters sized to fill most of the frame width (readable by OCR at 96 px)."""
    if not (2 <= len(text) <= 5 and all(ch in LETTERS for ch in text)):
        raise ValueError(f"sign text must be 2-5 uppercase letters A-Z, got {text!r}")
    choices = [bd for bd in BOARDS if contrasts(bd[0], background)]
    board = board or rng.choice(choices)
    if board not in choices:
        raise ValueError(f"board {board} has too little contrast with background {background!r}")
    short = min(width, height)
    font_px = min(0.30 * short, 0.72 * width * font_px_per_width(text))
    pad_x, pad_y = 0.35 * font_px, 0.3 * font_px
    bw, bh = font_px / font_px_per_width(text) + 2 * pad_x, font_px + 2 * pad_y
    bw, bh = min(bw, width - 2 * MARGIN), min(bh, height - 2 * MARGIN)
    x = rng.uniform(MARGIN + bw / 2, width - MARGIN - bw / 2)
    y = rng.uniform(max(MARGIN + bh / 2, 0.3 * height), min(height - MARGIN - bh / 2, 0.7 * height))
    return Sign(text, board[0], board[1], (x - bw / 2, y - bh / 2, x + bw / 2, y + bh / 2), font_px)


def random_sign_text(rng: random.Random, length: int) -> str:
    """Random letters from RANDOM_LETTERS (without a dictionary, OCR cannot tell a bare 'I' stroke from noise)."""
    return "".join(rng.choices(RANDOM_LETTERS, k=length))


@lru_cache(maxsize=64)
def text_font(px: int) -> ImageFont.FreeTypeFont:
    font = ImageFont.load_default(size=px)  # Pillow's built-in scalable font: identical on every machine
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise RuntimeError("Pillow was built without FreeType; sign text needs ImageFont.load_default(size=...)")
    return font


def font_px_per_width(text: str) -> float:
    """Font size per pixel of rendered text width (measured at 100 px, tracking and stroke included)."""
    font = text_font(100)
    return 100.0 / (sum(font.getlength(ch) for ch in text) + TRACKING * 100 * (len(text) - 1) + 2 * text_stroke(100))


def text_stroke(px: int) -> int:
    return max(1, round(0.04 * px))  # thickens the regular built-in face to a bold weight


# -------------------------------------------------------------------------------------------------------- sampling
def _optional(rng: random.Random, kind: str, odds: dict[str, float]) -> frozenset[str]:
    required, optional = STATABLE[kind]
    return frozenset(required | {a for a in sorted(optional) if rng.random() < odds[a]})


PINNABLE = ("colour", "shape", "size", "background", "position", "board", "text")  # what `sample_scene(pin=...)` fixes
TEXT_KINDS = ("listed", "random")  # a sign's `text` pin may name a kind of text instead of the texts themselves
BOARD_NAMES = tuple(board for board, _ in BOARDS)
OPTIONAL_ATTRIBUTES = frozenset().union(*(optional for _, optional in STATABLE.values()))


def _pin_values(pin: dict, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """The values `pin` allows for `name`: one value or a list of them; `default` when it is not pinned."""
    if name not in pin:
        return default
    value = pin[name]
    return (value,) if isinstance(value, str) else tuple(value)


def check_pin(pin: dict, pairs: str = "train") -> None:
    """ValueError naming the problem unless `pin` fixes a drawable appearance (see `sample_scene`)."""
    unknown = sorted(set(pin) - set(PINNABLE))
    if unknown:
        raise ValueError(f"pin: unknown attributes {unknown}; pinnable: {list(PINNABLE)}")
    for name, values in (("colour", COLOURS), ("shape", SHAPES), ("size", SIZES), ("background", BACKGROUNDS),
                         ("position", POSITIONS), ("board", BOARD_NAMES)):
        if name not in pin:
            continue
        given = pin[name]
        if not isinstance(given, str) and (not isinstance(given, (list, tuple)) or not given
                                           or not all(isinstance(v, str) for v in given)):
            raise ValueError(f"pin: {name} must be one value or a non-empty list of values, got {given!r}")
        bad = [v for v in _pin_values(pin, name, ()) if v not in values]
        if bad:
            raise ValueError(f"pin: {name} must be one of {list(values)}, got {given!r}")
    if "text" in pin:
        given = pin["text"]
        texts = (given,) if isinstance(given, str) else tuple(given) if isinstance(given, (list, tuple)) else ()
        if not (texts and all(isinstance(t, str) for t in texts)
                and (given in TEXT_KINDS or all(_sign_text_ok(t) for t in texts))):
            raise ValueError(f"pin: text must be one of {list(TEXT_KINDS)}, or one or a list of sign texts (2-5 "
                             f"letters A-Z), got {pin['text']!r}")
    backgrounds = _pin_values(pin, "background", tuple(BACKGROUNDS))
    if "board" in pin and not any(_pinned_boards(b, pin) for b in backgrounds):
        raise ValueError(f"pin: no board in {pin['board']!r} contrasts with a background in {list(backgrounds)}")
    if not any(_pinned_pairs(pairs, b, pin) for b in backgrounds):
        raise ValueError(f"pin: no drawable (colour, shape) matches {pin} with pairs={pairs!r} (held-out pair, or "
                         "a colour too close to the background)")


def _sign_text_ok(text: str) -> bool:
    return 2 <= len(text) <= 5 and all(c in LETTERS for c in text)


def _sign_text(rng: random.Random, pin: dict) -> str:
    """A sign's text: a listed word 60% of the time, else random letters; a `text` pin narrows the choice."""
    kind = pin.get("text")
    if kind is None:
        return rng.choice(WORDS) if rng.random() < 0.6 else random_sign_text(rng, rng.randint(2, 5))
    if kind == "listed":
        return rng.choice(WORDS)
    if kind == "random":
        return random_sign_text(rng, rng.randint(2, 5))
    return _pinned(rng, pin, "text", ())


def _pinned_pairs(pairs: str, background: str, pin: dict) -> list[tuple[str, str]]:
    colours, shapes = _pin_values(pin, "colour", COLOURS), _pin_values(pin, "shape", SHAPES)
    return [(c, s) for c, s in allowed_pairs(pairs, background) if c in colours and s in shapes]


def _pinned_boards(background: str, pin: dict) -> list[tuple[str, str]]:
    return [bd for bd in BOARDS if bd[0] in _pin_values(pin, "board", BOARD_NAMES) and contrasts(bd[0], background)]


def place_sign(sign: Sign, position: str, width: int, height: int) -> Sign:
    """`sign` moved so its board is centred on grid cell `position`, as near as the frame (less MARGIN) allows."""
    row, col = divmod(POSITIONS.index(position), 3)
    w, h = sign.bbox[2] - sign.bbox[0], sign.bbox[3] - sign.bbox[1]
    x = min(max(width * (col + 0.5) / 3, MARGIN + w / 2), width - MARGIN - w / 2)
    y = min(max(height * (row + 0.5) / 3, MARGIN + h / 2), height - MARGIN - h / 2)
    return replace(sign, bbox=(x - w / 2, y - h / 2, x + w / 2, y + h / 2))


def _pinned(rng: random.Random, pin: dict, name: str, default: tuple[str, ...]) -> str:
    """A value for `name`: the pinned one when one value is pinned (no draw), else drawn from the pinned list or
    from `default`."""
    value = pin.get(name)
    return value if isinstance(value, str) else rng.choice(_pin_values(pin, name, default))


def sample_scene(rng: random.Random, width: int, height: int, kinds: tuple[str, ...] = KINDS,
                 pairs: str = "train", state: frozenset[str] = frozenset(), pin: dict | None = None) -> Scene:
    """A random scene of a kind drawn uniformly from `kinds` (repeat a kind to weight it). `pairs="train"` never
    draws a HELD_OUT_PAIRS (colour, shape), "held_out" draws only them, "any" draws both.

    For training curricula: `state` names optional attributes (size, position, background) every caption states
    where its kind can state them; `pin` fixes the (first) object's colour, shape, size and the background, and a
    single object's position, to one value each or to a list of values drawn from (a background that clashes with
    the pinned colours is drawn again). For a sign, `pin` fixes the background, the board's colour ("board", with
    the letter colour that goes with it in BOARDS), where the board is centred ("position", a grid cell) and its
    text ("text": "listed" for WORDS only, "random" for random letters only, or the texts to draw from).
    Both off draw exactly what they drew before the options existed."""
    if not isinstance(rng, random.Random):
        raise ValueError(f"rng must be a random.Random, got {type(rng).__name__}")
    if not kinds or any(k not in KINDS for k in kinds):
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds!r}")
    if pairs not in PAIR_MODES:
        raise ValueError(f"pairs must be one of {PAIR_MODES}, got {pairs!r}")
    if pairs == "held_out" and "sign" in kinds:
        raise ValueError("pairs='held_out' applies to object scenes; remove 'sign' from kinds")
    if not set(state) <= OPTIONAL_ATTRIBUTES:
        raise ValueError(f"state: {sorted(set(state) - OPTIONAL_ATTRIBUTES)} cannot be stated optionally; "
                         f"choose from {sorted(OPTIONAL_ATTRIBUTES)}")
    pin = pin or {}
    if pin:
        check_pin(pin, pairs)
    kind = rng.choice(kinds)
    background = rng.choice(tuple(BACKGROUNDS))
    stated = _optional(rng, kind, {"size": 0.6, "position": 0.7, "background": 0.5}) | (set(state) &
                                                                                        STATABLE[kind][1])
    if kind == "sign":
        text = _sign_text(rng, pin)
        if "background" in pin:
            background = _pinned(rng, pin, "background", ())
        while "board" in pin and not _pinned_boards(background, pin):  # check_pin guarantees some background works
            background = rng.choice(_pin_values(pin, "background", tuple(BACKGROUNDS)))
        board = rng.choice(_pinned_boards(background, pin)) if "board" in pin else None
        sign = make_sign(rng, width, height, text, background, board)
        if "position" in pin:
            sign = place_sign(sign, _pinned(rng, pin, "position", ()), width, height)
        return Scene(kind, width, height, background, stated, sign=sign)
    if "background" in pin:
        background = _pinned(rng, pin, "background", ())
    while not _pinned_pairs(pairs, background, pin):  # check_pin guarantees some background works
        background = rng.choice(_pin_values(pin, "background", tuple(BACKGROUNDS)))
    choices = allowed_pairs(pairs, background)
    colour, shape = rng.choice(choices)
    if pin.keys() & {"colour", "shape"}:
        colour, shape = rng.choice(_pinned_pairs(pairs, background, pin))
    size = rng.choice(tuple(SIZES))  # drawn even when pinned to one value: the scenes of older caches stay the same
    if "size" in pin:
        size = _pinned(rng, pin, "size", ())
    if kind == "single":
        obj = make_object(rng, width, height, shape, colour, size, _pinned(rng, pin, "position", POSITIONS))
        return Scene(kind, width, height, background, stated, (obj,))
    if kind == "count":
        n = rng.randint(1, 3)
        objects = make_count(rng, width, height, colour, shape, n, "small" if n == 3 else size)
        return Scene(kind, width, height, background, stated, objects)
    other = rng.choice([p for p in choices if p[0] != colour])
    relation = rng.choice(RELATIONS)
    try:
        objects = make_relation(rng, width, height, (colour, shape), other, relation, size)
    except ValueError:  # two large objects may not fit side by side in a narrow frame
        objects = make_relation(rng, width, height, (colour, shape), other, relation, "small")
    return Scene(kind, width, height, background, stated, objects, relation)


# ----------------------------------------------------------------------------------------------------------- edits
def _edit_target(scene: Scene, rng: random.Random, index: int | None) -> int:
    if not scene.objects:
        raise ValueError(f"a {scene.kind!r} scene has no objects to edit")
    if index is None:
        return rng.randrange(len(scene.objects))
    if not 0 <= index < len(scene.objects):
        raise ValueError(f"index {index} out of range for {len(scene.objects)} objects")
    return index


def edit_recolor(scene: Scene, rng: random.Random, index: int | None = None, colour: str | None = None,
                 pairs: str = "train") -> tuple[Scene, str]:
    """Give one object a new colour (in a count scene all of them: they stay identical)."""
    i = _edit_target(scene, rng, index)
    old = scene.objects[i]
    taken = {o.colour for o in scene.objects}  # keep objects distinguishable by colour
    allowed = [c for c, s in allowed_pairs(pairs, scene.background) if s == old.shape and c not in taken]
    colour = rng.choice(allowed) if colour is None else colour
    if colour not in allowed:
        raise ValueError(f"colour {colour!r} not allowed for a {old.shape} on {scene.background!r} here: {allowed}")
    targets = range(len(scene.objects)) if scene.kind == "count" else (i,)
    objects = tuple(replace(o, colour=colour) if j in targets else o for j, o in enumerate(scene.objects))
    return replace(scene, objects=objects), recolor_instruction(scene, i, colour, rng)


def edit_remove(scene: Scene, rng: random.Random, index: int | None = None) -> tuple[Scene, str]:
    """Remove one object. Needs two or more objects: a relation scene becomes a single-object scene."""
    i = _edit_target(scene, rng, index)
    if len(scene.objects) < 2:
        raise ValueError(f"edit_remove needs at least 2 objects, the scene has {len(scene.objects)}")
    objects = scene.objects[:i] + scene.objects[i + 1:]
    if scene.kind == "relation":
        stated = frozenset({"colour", "shape"} | (scene.stated & {"background"}))
        return (replace(scene, kind="single", objects=objects, relation=None, stated=stated),
                remove_instruction(scene, i, rng))
    return replace(scene, objects=objects), remove_instruction(scene, i, rng)


def edit_move(scene: Scene, rng: random.Random, index: int | None = None,
              position: str | None = None) -> tuple[Scene, str]:
    """Move one object, unchanged in size, to another grid cell (keeping a relation scene's relation clear)."""
    i = _edit_target(scene, rng, index)
    old, others = scene.objects[i], scene.objects[:i] + scene.objects[i + 1:]
    targets = [p for p in POSITIONS if p != old.position] if position is None else [position]
    rng.shuffle(targets)
    for target in targets:
        try:
            moved = make_object(rng, scene.width, scene.height, old.shape, old.colour, old.size, target,
                                avoid=others, extent=old.extent)
        except ValueError:
            continue
        objects = scene.objects[:i] + (moved,) + scene.objects[i + 1:]
        relation = relation_of(*objects) if scene.kind == "relation" else None
        if scene.kind != "relation" or relation is not None:
            return replace(scene, objects=objects, relation=relation), move_instruction(scene, i, target, rng)
    raise ValueError(f"cannot move object {i} ({old.colour} {old.shape}) to any of {targets}")
