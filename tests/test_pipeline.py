"""The whole pipeline against diffusers' FluxPipeline on one tiny random folder, plus behaviour and input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fluxkit import FluxPipeline

PROMPTS = ["a red circle above a blue square", "a small green star on a black background"]
NEGATIVE = ["blurry photo", "ugly"]


def _gen(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


@pytest.fixture(scope="module")
def dev_pair(tiny_dev_folder):
    from diffusers import FluxPipeline as DiffusersFlux

    ours = FluxPipeline.from_pretrained(tiny_dev_folder, torch_dtype=torch.float32)
    ref = DiffusersFlux.from_pretrained(tiny_dev_folder, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    return ours, ref


def test_dev_image_equals_diffusers(dev_pair):
    """Non-square, two prompts, two images per prompt, true CFG with negative prompts: within 2/255 per pixel."""
    ours, ref = dev_pair
    kwargs = dict(
        height=48,
        width=80,
        num_inference_steps=3,
        guidance_scale=3.5,
        num_images_per_prompt=2,
        true_cfg_scale=2.5,
        max_sequence_length=16,
        output_type="np",
    )
    a = ref(PROMPTS, negative_prompt=NEGATIVE, generator=_gen(3), **kwargs).images
    b = ours(PROMPTS, negative_prompt=NEGATIVE, generator=_gen(3), **kwargs).images
    assert a.shape == b.shape == (4, 48, 80, 3)
    assert np.abs(a - b).max() <= 2 / 255
    assert a.std() > 0.02  # a real image, not a constant


def test_schnell_image_equals_diffusers(tiny_schnell_folder):
    from diffusers import FluxPipeline as DiffusersFlux

    ours = FluxPipeline.from_pretrained(tiny_schnell_folder, torch_dtype=torch.float32)
    ref = DiffusersFlux.from_pretrained(tiny_schnell_folder, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    gens = lambda: [_gen(s) for s in (11, 12)]  # noqa: E731
    kwargs = dict(
        height=64, width=32, num_inference_steps=2, guidance_scale=0.0, output_type="np", max_sequence_length=16
    )
    a = ref(PROMPTS, generator=gens(), **kwargs).images
    b = ours(PROMPTS, generator=gens(), **kwargs).images
    assert np.abs(a - b).max() <= 2 / 255


def test_pil_output_and_seed_snippet(dev_pair):
    ours, _ = dev_pair
    image = ours(
        PROMPTS[0],
        guidance_scale=0.0,
        num_inference_steps=2,
        height=32,
        width=32,
        generator=torch.Generator("cpu").manual_seed(42),
    ).images[0]
    assert image.size == (32, 32) and image.mode == "RGB"


def _img(pipe, prompt=PROMPTS[0], seed=0, **kw):
    args = dict(height=32, width=48, num_inference_steps=2, output_type="np", generator=_gen(seed))
    args.update(kw)
    return pipe(prompt, **args).images


def test_behaviour_prompt_seed_guidance_prompt2(dev_pair):
    ours, _ = dev_pair
    base = _img(ours)
    assert np.array_equal(base, _img(ours)), "same inputs must give the same image"
    assert np.abs(base - _img(ours, prompt=PROMPTS[1])).max() > 1e-3
    assert np.abs(base - _img(ours, seed=1)).max() > 1e-3
    assert np.abs(base - _img(ours, guidance_scale=7.0)).max() > 1e-3
    assert np.abs(base - _img(ours, prompt_2=PROMPTS[1])).max() > 1e-3
    schedule = _img(ours, guidance_scale=[7.0, 1.0])
    assert np.abs(schedule - _img(ours, guidance_scale=7.0)).max() > 1e-4


def test_batch_size_shorthand_keeps_order(dev_pair):
    ours, _ = dev_pair
    gens = [_gen(s) for s in (1, 2, 3)]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    batched = ours(prompts, batch_size=2, height=32, width=32, steps=2, generator=gens, output_type="np").images
    alone = ours(prompts[2], height=32, width=32, steps=2, generator=_gen(3), output_type="np").images
    assert batched.shape[0] == 3
    assert np.abs(batched[2] - alone[0]).max() <= 1 / 255


def test_latent_and_pt_outputs(dev_pair):
    ours, _ = dev_pair
    lat = ours(PROMPTS[0], height=32, width=32, steps=1, output_type="latent", generator=_gen()).images
    assert lat.shape == (1, 4, 64)
    pt = ours(PROMPTS[0], height=32, width=32, steps=1, output_type="pt", generator=_gen()).images
    assert pt.shape == (1, 3, 32, 32) and 0 <= pt.min() and pt.max() <= 1


def test_callback_sees_every_step_and_can_edit_latents(dev_pair):
    ours, _ = dev_pair
    steps = []

    def cb(pipe, i, t, kw):
        steps.append(i)
        return {"latents": torch.zeros_like(kw["latents"])} if i == 2 else kw

    img = ours(
        PROMPTS[0], height=32, width=32, steps=3, callback_on_step_end=cb, output_type="latent", generator=_gen()
    ).images
    assert steps == [0, 1, 2]
    assert torch.count_nonzero(img) == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(height=40), "height must be a multiple of 16"),
        (dict(width=33), "width must be a multiple of 16"),
        (dict(prompt=3), "prompt must be a string"),
        (dict(prompt_2=["a", "b"]), "prompt_2 has 2 entries"),
        (dict(max_sequence_length=100_000), "max_sequence_length"),
        (dict(output_type="jpeg"), "output_type"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(negative_prompt="x"), "true_cfg_scale > 1"),
        (dict(generator=[torch.Generator(), torch.Generator()]), "generators"),
        (dict(guidance_scale=[1.0, 2.0, 3.0]), "schedule has 3 values for 2 steps"),
        (dict(steps=2, num_inference_steps=3), "disagree"),
        (dict(joint_attention_kwargs={"foo": 1}), "unsupported keys"),
    ],
)
def test_bad_input_is_a_precise_value_error(dev_pair, kwargs, match):
    ours, _ = dev_pair
    args = dict(prompt=PROMPTS[0], height=32, width=32, num_inference_steps=2)
    args.update(kwargs)
    if "steps" in kwargs:
        args.pop("num_inference_steps") if "num_inference_steps" not in kwargs else None
    with pytest.raises(ValueError, match=match):
        ours(**args)
