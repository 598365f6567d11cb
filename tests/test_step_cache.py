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


def _model_inputs(seed=0):
    from fluxkit.model import Flux
    from fluxkit.params import TEST_FLUX
    from fluxkit.sampling import image_ids, text_ids

    torch.manual_seed(seed)
    model = Flux(TEST_FLUX).eval()
    args = (
        torch.randn(1, 12, 64),
        image_ids(1, 3, 4),
        torch.randn(1, 5, 48),
        text_ids(1, 5),
        torch.tensor([0.5]),
        torch.randn(1, 32),
        torch.tensor([3.5]),
    )
    return model, args


@pytest.mark.parametrize(
    "config", [FirstBlockCacheConfig(threshold=0.05), TeaCacheConfig(threshold=0.4)], ids=["fbcache", "teacache"]
)
@torch.no_grad()
def test_unchanged_input_is_served_from_the_cache(config):
    model, args = _model_inputs()
    full = model(*args)
    cache = model.enable_cache(config)
    first = model(*args)  # computes and fills the cache
    second = model(*args)  # same signal: skipped, cached residual reused
    assert cache.stats() == {"calls": 2, "full": 1, "skipped": 1, "call_ratio": 2.0}
    assert torch.equal(first, full) and torch.allclose(second, full, atol=1e-6)
    moved = (args[0] + 0.5 * torch.randn_like(args[0]),) + args[1:]  # a big change: recomputed
    assert torch.allclose(model(*moved), (model.disable_cache(), model(*moved))[1], atol=1e-6)
    assert cache.stats()["skipped"] == 1


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
