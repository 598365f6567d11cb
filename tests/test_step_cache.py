"""Step caching: off is exact, on skips calls and stays close; state never leaks between generations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fluxkit import FluxPipeline
from fluxkit.step_cache import FirstBlockCacheConfig, TeaCacheConfig


@pytest.fixture(scope="module")
def pipe(tiny_dev_folder):
    return FluxPipeline.from_pretrained(tiny_dev_folder, torch_dtype=torch.float32)


def _run(pipe, steps=12, **kw):
    return pipe(
        "a red circle above a blue square",
        height=32,
        width=48,
        num_inference_steps=steps,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **kw,
    ).images


def test_disabled_cache_is_exact(pipe):
    ref = _run(pipe)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.0))  # threshold 0 never skips
    try:
        assert np.array_equal(_run(pipe), ref)
        assert pipe.transformer.step_cache.stats()["skipped"] == 0
    finally:
        pipe.transformer.disable_cache()
    assert np.array_equal(_run(pipe), ref)


# A random network's output moves a lot between steps (relative changes 0.4-1.4), so these thresholds are far above
# what a trained model uses; the trained-model trade-off is measured in benchmarks/step_cache.py.
@pytest.mark.parametrize(
    "config",
    [FirstBlockCacheConfig(threshold=1.0), TeaCacheConfig(1.0, coefficients=(1.0, 0.0))],
    ids=["fbcache", "teacache"],
)
def test_cache_skips_calls_and_stays_close(pipe, config):
    ref = _run(pipe)
    other_seed = pipe(
        "a red circle above a blue square",
        height=32,
        width=48,
        num_inference_steps=12,
        output_type="np",
        generator=torch.Generator().manual_seed(1),
    ).images
    cache = pipe.transformer.enable_cache(config)
    try:
        out = _run(pipe)
        stats = cache.stats()
        assert stats["calls"] == 12 and stats["skipped"] > 0, stats
        assert 0 < np.abs(out - ref).mean() < 0.5 * np.abs(other_seed - ref).mean()
        again = _run(pipe)  # the cache resets per generation: same result twice
        assert np.array_equal(out, again)
    finally:
        pipe.transformer.disable_cache()


def test_cache_with_true_cfg_keeps_contexts_apart(pipe):
    kw = dict(negative_prompt="blurry", true_cfg_scale=3.0)
    ref = _run(pipe, **kw)
    cache = pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.0))
    try:
        assert np.array_equal(_run(pipe, **kw), ref)
        assert cache.stats()["calls"] == 24
    finally:
        pipe.transformer.disable_cache()


def test_bad_threshold():
    from fluxkit.step_cache import StepCache

    with pytest.raises(ValueError, match="threshold"):
        StepCache(FirstBlockCacheConfig(threshold=-1))
