"""The sampler against diffusers' scheduler and pipeline helpers (the oracle), plus its own invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fluxkit import sampling
from fluxkit.sampling import ShiftConfig


@pytest.mark.parametrize("steps", [1, 4, 20, 28, 50])
@pytest.mark.parametrize("size", [(256, 256), (512, 512), (1024, 1024), (768, 1360), (1536, 640)])
def test_shifted_schedule_equals_flowmatch_scheduler(steps, size):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    seq_len = (size[0] // 16) * (size[1] // 16)
    sched = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(seq_len, 256, 4096, 0.5, 1.15))
    ours = sampling.get_schedule(steps, seq_len, shift=ShiftConfig())
    assert torch.equal(ours, sched.sigmas)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_schnell_schedule_is_linear_and_matches_unshifted_scheduler(steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))
    ours = sampling.get_schedule(steps, 4096, shift=None)
    assert torch.equal(ours, sched.sigmas)
    assert torch.allclose(ours, torch.linspace(1, 0, steps + 1))


def test_known_shift_values():
    # spec §5.2: 4 steps at 1024^2 shifted -> [1, 0.9045, 0.7595, 0.5128, 0]
    s = sampling.get_schedule(4, 4096, shift=ShiftConfig())
    assert torch.allclose(s, torch.tensor([1.0, 0.9045, 0.7595, 0.5128, 0.0]), atol=1e-4)


def test_custom_sigmas_validated():
    with pytest.raises(ValueError, match="sigmas"):
        sampling.get_schedule(3, 256, shift=None, sigmas=[1.0, 1.5, 0.2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noise_equals_diffusers_randn_tensor(dtype):
    from diffusers.utils.torch_utils import randn_tensor

    shape = (3, 16, 2 * (96 // 16), 2 * (160 // 16))
    ref = randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(7), device=torch.device("cpu"), dtype=dtype)
    ours = sampling.get_noise(3, 16, 96, 160, generator=torch.Generator("cpu").manual_seed(7), dtype=dtype)
    assert torch.equal(ours, ref)
    gens = [torch.Generator("cpu").manual_seed(s) for s in (1, 2, 3)]
    ref = randn_tensor(
        shape,
        generator=[torch.Generator("cpu").manual_seed(s) for s in (1, 2, 3)],
        device=torch.device("cpu"),
        dtype=dtype,
    )
    assert torch.equal(sampling.get_noise(3, 16, 96, 160, generator=gens, dtype=dtype), ref)


def test_noise_rejects_wrong_generator_count():
    with pytest.raises(ValueError, match="generators"):
        sampling.get_noise(3, 16, 32, 32, generator=[torch.Generator(), torch.Generator()], dtype=torch.float32)


def test_pack_matches_diffusers_and_unpack_inverts():
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 12, 20)
    ours = sampling.pack(x)
    assert torch.equal(ours, FluxPipeline._pack_latents(x, 2, 16, 12, 20))
    assert torch.equal(sampling.unpack(ours, 12, 20), x)
    ids = sampling.image_ids(2, 6, 10)
    ref = FluxPipeline._prepare_latent_image_ids(2, 6, 10, "cpu", torch.float32)
    assert torch.equal(ids[0], ref) and torch.equal(ids[1], ref)
    assert torch.equal(sampling.image_ids(1, 2, 2, index=1)[0, :, 0], torch.ones(4))


def test_euler_loop_integrates_constant_velocity_exactly():
    x0 = torch.randn(1, 4, 8)
    noise = torch.randn(1, 4, 8)
    v = noise - x0
    seen = []
    out = sampling.denoise(
        lambda x, t, i: v,
        noise.clone(),
        sampling.get_schedule(5, 256, shift=ShiftConfig()),
        callback=lambda i, s, x: seen.append(i),
    )
    assert torch.allclose(out, x0, atol=1e-5)
    assert seen == [0, 1, 2, 3, 4]
