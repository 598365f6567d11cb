"""Step caching: skip most of the transformer on steps where its output would barely change.

Two policies, both deciding from cheap signals computed at the start of each forward:
- First-block cache (ParaAttention's FBCache): run the first double block; if its image residual changed by less
  than `threshold` (relative mean absolute difference) since the last full step, reuse the later blocks' residual.
- TeaCache (Liu et al. 2024, "Timestep Embedding Tells"): the relative L1 change of the first block's modulated input,
  rescaled by a polynomial fitted for FLUX.1, is accumulated over steps; while the sum stays below `threshold` the
  whole block stack is skipped and its last residual reused.

A cache holds per-context state ("cond" / "uncond" for true CFG) and counts calls and skips. `reset()` runs before
each generation, so cached tensors never leak between images; `stats()` counts over the cache's lifetime.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from torch import Tensor

# TeaCache's rescaling polynomial for FLUX.1 (highest power first), from the TeaCache4FLUX release.
TEACACHE_FLUX_COEFFS = (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01)


@dataclass
class FirstBlockCacheConfig:
    threshold: float = 0.08


@dataclass
class TeaCacheConfig:
    threshold: float = 0.4
    coefficients: tuple[float, ...] = TEACACHE_FLUX_COEFFS


@dataclass
class _State:
    reference: Tensor | None = None  # the signal at the last fully computed step
    residual: Tensor | None = None  # what the skipped blocks added at that step
    accumulated: float = 0.0  # TeaCache's running distance


@dataclass
class StepCache:
    config: FirstBlockCacheConfig | TeaCacheConfig
    context: str = "cond"
    calls: int = 0
    skipped: int = 0
    _states: dict[str, _State] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.config, (FirstBlockCacheConfig, TeaCacheConfig)):
            raise ValueError(f"unknown cache config {self.config!r}")
        if self.config.threshold < 0:
            raise ValueError(f"cache threshold must be >= 0, got {self.config.threshold}")

    def reset(self) -> None:
        """Forget cached tensors (before each generation); the call counters keep accumulating."""
        self._states.clear()
        self.context = "cond"

    @property
    def state(self) -> _State:
        return self._states.setdefault(self.context, _State())

    def stats(self) -> dict[str, float]:
        full = self.calls - self.skipped
        return {
            "calls": self.calls,
            "full": full,
            "skipped": self.skipped,
            "call_ratio": self.calls / full if full else float("inf"),
        }


def _rel_l1(a: Tensor, b: Tensor) -> float:
    return ((a.float() - b.float()).abs().mean() / b.float().abs().mean().clamp(min=1e-8)).item()


def run_blocks_cached(model, cache: StepCache, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor, mask) -> Tensor:
    """The transformer's block stack with `cache` deciding what to recompute. Returns the image tokens."""
    cache.calls += 1
    state = cache.state
    if isinstance(cache.config, FirstBlockCacheConfig):
        return _first_block(model, cache, state, img, txt, vec, pe, mask)
    return _teacache(model, cache, state, img, txt, vec, pe, mask)


def _first_block(model, cache: StepCache, state: _State, img, txt, vec, pe, mask) -> Tensor:
    first, *rest = model.double_blocks
    img1, txt1 = first(img, txt, vec, pe, mask)
    signal = img1 - img  # the first block's residual
    if state.reference is not None and _rel_l1(signal, state.reference) < cache.config.threshold:
        cache.skipped += 1
        return img1 + state.residual
    out = model.run_blocks(img1, txt1, vec, pe, mask, double_blocks=rest)
    state.reference, state.residual = signal, out - img1
    return out


def _teacache(model, cache: StepCache, state: _State, img, txt, vec, pe, mask) -> Tensor:
    first = model.double_blocks[0]
    mod, _ = first.img_mod(vec)
    signal = mod.modulate(first.img_norm1(img))  # the first block's modulated input: cheap, moves with t
    if state.reference is not None and state.residual is not None:
        state.accumulated += float(np.polyval(cache.config.coefficients, _rel_l1(signal, state.reference)))
        state.reference = signal
        if state.accumulated < cache.config.threshold:
            cache.skipped += 1
            return img + state.residual
    state.reference, state.accumulated = signal, 0.0
    out = model.run_blocks(img, txt, vec, pe, mask)
    state.residual = out - img
    return out
