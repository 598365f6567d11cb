"""The standard evaluation suite: prompts built from Scene specs, by category, times generation seeds.

Deterministic: the same arguments always give the same prompts and scenes. Each category cycles through its
vocabulary (every position, colour, shape, ... appears) and draws the rest from a category-specific rng. Only the
"held_out" category uses HELD_OUT_PAIRS, which the training sampler never produces.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from fluxkit.data.captions import caption
from fluxkit.data.scenes import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT_PAIRS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    WORDS,
    Scene,
    allowed_pairs,
    contrasts,
    make_count,
    make_object,
    make_relation,
    make_sign,
    random_sign_text,
)

CATEGORIES = ("position", "colour", "shape", "size", "count", "relation", "background", "sign_word", "sign_random",
              "held_out")
FULL_COUNTS = {"position": 18, "colour": 18, "shape": 16, "size": 12, "count": 15, "relation": 16,
               "background": 14, "sign_word": 16, "sign_random": 12, "held_out": 12}  # 149 prompts
QUICK_COUNT = 4  # prompts per category with quick=True


@dataclass(frozen=True)
class EvalItem:
    id: str
    category: str
    prompt: str
    scene: Scene
    seed: int  # generation seed


def _background_for(rng: random.Random, *colours: str) -> str:
    return rng.choice([bg for bg in BACKGROUNDS if all(contrasts(c, bg) for c in colours)])


def _train_pair(rng: random.Random, colour: str | None = None, shape: str | None = None,
                not_colour: str | None = None) -> tuple[str, str]:
    """A (colour, shape) pair the training sampler can produce, optionally with a given colour or shape."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT_PAIRS
             and colour in (None, c) and shape in (None, s) and c != not_colour]
    return rng.choice(pairs)


def _single(rng: random.Random, width: int, height: int, pair: tuple[str, str], stated: set[str],
            background: str | None = None, size: str | None = None, position: str | None = None) -> Scene:
    colour, shape = pair
    background = background or _background_for(rng, colour)
    obj = make_object(rng, width, height, shape, colour, size or rng.choice(tuple(SIZES)),
                      position or rng.choice(POSITIONS))
    return Scene("single", width, height, background, frozenset(stated), (obj,))


def _scene(category: str, k: int, rng: random.Random, width: int, height: int) -> Scene:
    """The k-th scene of `category`: vocabulary item k % len(vocabulary), everything else from `rng`."""
    if category == "position":
        return _single(rng, width, height, _train_pair(rng), {"colour", "shape", "position"},
                       position=POSITIONS[k % len(POSITIONS)])
    if category == "colour":
        return _single(rng, width, height, _train_pair(rng, colour=tuple(COLOURS)[k % len(COLOURS)]),
                       {"colour", "shape"})
    if category == "shape":
        return _single(rng, width, height, _train_pair(rng, shape=SHAPES[k % len(SHAPES)]), {"colour", "shape"})
    if category == "size":
        return _single(rng, width, height, _train_pair(rng), {"colour", "shape", "size"},
                       size=tuple(SIZES)[k % len(SIZES)])
    if category == "background":
        background = tuple(BACKGROUNDS)[k % len(BACKGROUNDS)]
        pair = rng.choice(allowed_pairs("train", background))
        return _single(rng, width, height, pair, {"colour", "shape", "background"}, background=background)
    if category == "held_out":
        return _single(rng, width, height, sorted(HELD_OUT_PAIRS)[k % len(HELD_OUT_PAIRS)], {"colour", "shape"})
    if category == "count":
        n, (colour, shape) = 1 + k % 3, _train_pair(rng)
        objects = make_count(rng, width, height, colour, shape, n, "small" if n == 3 else rng.choice(tuple(SIZES)))
        return Scene("count", width, height, _background_for(rng, colour), frozenset({"count", "colour", "shape"}),
                     objects)
    if category == "relation":
        a = _train_pair(rng)
        b = _train_pair(rng, not_colour=a[0])
        objects = make_relation(rng, width, height, a, b, RELATIONS[k % len(RELATIONS)])
        return Scene("relation", width, height, _background_for(rng, a[0], b[0]),
                     frozenset({"colour", "shape", "relation"}), objects, RELATIONS[k % len(RELATIONS)])
    if category in ("sign_word", "sign_random"):
        text = (WORDS[k % len(WORDS)] if category == "sign_word"
                else random_sign_text(rng, 2 + (k + 1) % 4))
        background = rng.choice(tuple(BACKGROUNDS))
        sign = make_sign(rng, width, height, text, background)
        return Scene("sign", width, height, background, frozenset({"text"}), sign=sign)
    raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")


def build_suite(quick: bool = False, seeds: tuple[int, ...] = (0, 1), size: tuple[int, int] = (128, 128),
                categories: tuple[str, ...] = CATEGORIES, suite_seed: int = 0) -> list[EvalItem]:
    """Every category's prompts (FULL_COUNTS, or QUICK_COUNT each with `quick`), each once per generation seed.

    size: (width, height) of every scene; the generator must return images of this size.
    """
    if not seeds:
        raise ValueError("seeds must name at least one generation seed")
    bad = [c for c in categories if c not in CATEGORIES]
    if bad or not categories:
        raise ValueError(f"categories must be a non-empty subset of {CATEGORIES}, got {categories!r}")
    width, height = size
    if width % 16 or height % 16 or width <= 0 or height <= 0:
        raise ValueError(f"size must be (width, height) positive multiples of 16, got {size}")
    items = []
    for category in categories:
        rng = random.Random(f"fluxkit-suite/{suite_seed}/{category}/{width}x{height}")
        for k in range(QUICK_COUNT if quick else FULL_COUNTS[category]):
            scene = _scene(category, k, rng, width, height)
            prompt = caption(scene, rng)
            items += [EvalItem(f"{category}-{k:03d}-s{seed}", category, prompt, scene, seed) for seed in seeds]
    return items

