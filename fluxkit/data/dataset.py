"""The deterministic scene dataset: item i is a scene drawn from (seed, i), rendered and captioned."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from fluxkit.data.captions import caption
from fluxkit.data.render import render
from fluxkit.data.scenes import IMAGE_SIZES, KINDS, Scene, allowed_pairs, check_pin, sample_scene


@dataclass(frozen=True)
class Sample:
    image: np.ndarray  # (H, W, 3) uint8
    caption: str
    scene: Scene
    masks: list[np.ndarray]


class SceneDataset:
    """Deterministic indexable source: item i depends only on (seed, i), never on access order."""

    def __init__(self, seed: int, n: int, sizes: tuple[tuple[int, int], ...] = IMAGE_SIZES,
                 kinds: tuple[str, ...] = KINDS, pairs: str = "train", state: tuple[str, ...] = (),
                 pin: dict[str, str] | None = None):
        """`state`, `pin`: training curricula, as `sample_scene` takes them."""
        if n <= 0:
            raise ValueError(f"n must be positive, got {n}")
        for w, h in sizes:
            if w % 16 or h % 16 or w <= 0 or h <= 0:
                raise ValueError(f"sizes must be (width, height) positive multiples of 16, got {(w, h)}")
        allowed_pairs(pairs, "white")  # validates `pairs`
        if not kinds or any(k not in KINDS for k in kinds):
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds!r}")
        self.seed, self.n, self.sizes, self.kinds, self.pairs = seed, n, tuple(sizes), tuple(kinds), pairs
        self.state, self.pin = frozenset(state), dict(pin or {})
        if self.pin:
            check_pin(self.pin, pairs)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for SceneDataset of length {self.n}")
        rng = random.Random(f"fluxkit-scenes/{self.seed}/{i}")  # str seeds hash with sha512: stable across runs
        width, height = rng.choice(self.sizes)
        scene = sample_scene(rng, width, height, self.kinds, self.pairs, self.state, self.pin)
        result = render(scene)
        return Sample(result.image, caption(scene, rng), scene, result.masks)
