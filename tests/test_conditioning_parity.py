"""img2img, inpaint, Fill, Control and Kontext against diffusers' pipelines on tiny random models of each layout:
the same generator gives the same image within 2/255.

One documented difference (fluxkit.conditioning.vae_latents): with a single input image and a list of generators,
diffusers draws the image's VAE posterior sample from the first generator only, so images 1.. depend on the batch
they are generated in. fluxkit lets every generator draw its own sample: image 0 matches diffusers, and images 1..
are tested against our own reference, the same image generated alone with its generator.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_diffusers_pipeline
from test_conditioning import picture, right_half_mask

from fluxkit import (
    FluxControlPipeline,
    FluxFillPipeline,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxKontextPipeline,
)
from fluxkit.conditioning import pad_for_outpaint

PROMPTS = ["a red circle above a blue square", "a small green star"]
KW = dict(height=32, width=48, num_inference_steps=4, output_type="np", max_sequence_length=16)
TOL = 2 / 255


def _gen(seed):
    return torch.Generator("cpu").manual_seed(seed)


def _pair(folder, ours_cls, theirs_name):
    import diffusers

    theirs = getattr(diffusers, theirs_name).from_pretrained(folder, torch_dtype=torch.float32)
    theirs.set_progress_bar_config(disable=True)
    return ours_cls.from_pretrained(folder, torch_dtype=torch.float32), theirs


@pytest.fixture(scope="module")
def fill_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-flux-fill")
    tiny_diffusers_pipeline(guidance_embeds=True, in_channels=384).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def control_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-flux-control")
    tiny_diffusers_pipeline(guidance_embeds=True, in_channels=128).save_pretrained(folder)
    return folder


def _same(a, b):
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= TOL
    assert a.std() > 0.02  # a real image, not a constant


def test_img2img_equals_diffusers(tiny_dev_folder):
    ours, theirs = _pair(tiny_dev_folder, FluxImg2ImgPipeline, "FluxImg2ImgPipeline")
    args = dict(image=picture(), strength=0.7, guidance_scale=3.5, **KW)
    _same(theirs(PROMPTS, generator=_gen(1), **args).images, ours(PROMPTS, generator=_gen(1), **args).images)
    # a list of generators with one image per generated image: each image draws with its own generator in both
    images = [picture(seed=0), picture(seed=1)]
    args["image"] = images
    a = theirs(PROMPTS, generator=[_gen(1), _gen(2)], **args).images
    _same(a, ours(PROMPTS, generator=[_gen(1), _gen(2)], **args).images)


def test_img2img_generator_list_with_one_image(tiny_dev_folder):
    """The documented difference: image 0 matches diffusers; image 1 is what it would be on its own."""
    ours, theirs = _pair(tiny_dev_folder, FluxImg2ImgPipeline, "FluxImg2ImgPipeline")
    args = dict(image=picture(), strength=0.7, guidance_scale=3.5, **KW)
    a = theirs(PROMPTS, generator=[_gen(1), _gen(2)], **args).images
    b = ours(PROMPTS, generator=[_gen(1), _gen(2)], **args).images
    _same(a[:1], b[:1])
    alone = ours(PROMPTS[1], generator=_gen(2), **args).images
    _same(alone, b[1:])


def test_inpaint_equals_diffusers(tiny_dev_folder):
    ours, theirs = _pair(tiny_dev_folder, FluxInpaintPipeline, "FluxInpaintPipeline")
    args = dict(image=picture(), mask_image=right_half_mask(), strength=0.8, guidance_scale=3.5, **KW)
    _same(theirs(PROMPTS, generator=_gen(3), **args).images, ours(PROMPTS, generator=_gen(3), **args).images)


def test_fill_and_outpaint_equal_diffusers(fill_folder):
    ours, theirs = _pair(fill_folder, FluxFillPipeline, "FluxFillPipeline")
    args = dict(image=picture(), mask_image=right_half_mask(), guidance_scale=30.0, **KW)
    _same(theirs(PROMPTS, generator=_gen(5), **args).images, ours(PROMPTS, generator=_gen(5), **args).images)
    args["strength"] = 0.8
    a = theirs(PROMPTS[0], generator=_gen(6), num_images_per_prompt=2, **args).images
    _same(a, ours(PROMPTS[0], generator=_gen(6), num_images_per_prompt=2, **args).images)
    image, mask = pad_for_outpaint(picture(32, 32), left=16)
    args.update(image=image, mask_image=mask, strength=1.0)
    _same(theirs(PROMPTS[1], generator=_gen(7), **args).images, ours(PROMPTS[1], generator=_gen(7), **args).images)


def test_control_equals_diffusers(control_folder):
    ours, theirs = _pair(control_folder, FluxControlPipeline, "FluxControlPipeline")
    args = dict(control_image=picture(), guidance_scale=3.5, num_images_per_prompt=2, **KW)
    _same(theirs(PROMPTS, generator=_gen(5), **args).images, ours(PROMPTS, generator=_gen(5), **args).images)
    gens = lambda: [_gen(s) for s in (5, 6, 7, 8)]  # noqa: E731  diffusers repeats the image first: same draws
    _same(theirs(PROMPTS, generator=gens(), **args).images, ours(PROMPTS, generator=gens(), **args).images)


def test_kontext_equals_diffusers(tiny_dev_folder):
    ours, theirs = _pair(tiny_dev_folder, FluxKontextPipeline, "FluxKontextPipeline")
    # a context image of another size and shape than the output; auto-resize off (its sizes are for 1024^2)
    args = dict(image=picture(48, 32), max_area=32 * 48, _auto_resize=False, guidance_scale=2.5, **KW)
    a = theirs(prompt=PROMPTS, generator=_gen(3), true_cfg_scale=2.0, negative_prompt="blurry", **args).images
    b = ours(prompt=PROMPTS, generator=_gen(3), true_cfg_scale=2.0, negative_prompt="blurry", **args).images
    _same(a, b)
