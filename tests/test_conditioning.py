"""Conditioning hooks on the one pipeline: img2img strength, inpainting, Fill packing, Kontext ids, Control,
composition, image inputs, the diffusers-named pipelines' own arguments, and structure extraction (fluxkit.control)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from fluxkit import FluxImg2ImgPipeline, FluxKontextPipeline, FluxPipeline, sampling
from fluxkit.conditioning import (
    Compose,
    Control,
    Fill,
    Img2Img,
    Inpaint,
    Kontext,
    pack_mask,
    pad_for_outpaint,
    start_index,
    to_mask,
    to_pixels,
)
from fluxkit.model import Flux
from fluxkit.pipelines import kontext_size

PROMPT = "a red circle above a blue square"
KW = dict(height=32, width=48, guidance_scale=3.5, max_sequence_length=16)


def _gen(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


def picture(h=32, w=48, seed=0) -> Image.Image:
    """Gradients plus a flat rectangle: structure for the VAE and for edge detection."""
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x / w, y / h, (x + y) % 7 / 7], -1) * 255
    a[8:20, 10:30] = np.random.default_rng(seed).integers(0, 255, 3)
    return Image.fromarray(a.astype(np.uint8))


def right_half_mask(h=32, w=48) -> Image.Image:
    m = np.zeros((h, w), np.uint8)
    m[:, w // 2 :] = 255
    return Image.fromarray(m)


@pytest.fixture(scope="module")
def pipe(tiny_dev_folder):
    return FluxPipeline.from_pretrained(tiny_dev_folder, torch_dtype=torch.float32)


def _variant(pipe, in_channels: int) -> FluxPipeline:
    """The same tiny pipeline with a random transformer whose img_in is `in_channels` wide (a Fill/Control layout)."""
    torch.manual_seed(0)
    model = Flux(dataclasses.replace(pipe.transformer.params, in_channels=in_channels))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    spec = dataclasses.replace(pipe.spec, flux=model.params)
    return FluxPipeline(model.eval(), pipe.vae, pipe.text_encoder, spec, pipe.scheduler)


# -- img2img -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, strength, start", [(4, 1.0, 0), (4, 0.5, 2), (10, 0.8, 2), (28, 0.6, 11), (3, 0.34, 1)])
def test_start_index_follows_diffusers(n, strength, start):
    # (10, 0.8): diffusers skips 2 steps where BFL's int((1 - s) * n) skips 1 (flux-spec §5.6).
    assert start_index(n, strength) == start


def test_start_index_rejects_a_strength_that_leaves_no_step():
    with pytest.raises(ValueError, match="no step"):
        start_index(4, 0.0)
    with pytest.raises(ValueError, match="strength"):
        Img2Img(picture(), strength=1.5)


def test_img2img_strength_one_is_text_to_image(pipe):
    """At strength 1 the start state is the noise itself: the same noise gives the text-to-image result exactly."""
    noise = sampling.pack(torch.randn(1, 16, 4, 6, generator=_gen(3)))
    base = pipe(PROMPT, latents=noise, steps=3, output_type="latent", **KW).images
    hook = Img2Img(picture(), strength=1.0)
    edited = pipe(PROMPT, latents=noise, steps=3, output_type="latent", conditioning=hook, **KW).images
    assert torch.equal(base, edited)


def test_img2img_lower_strength_stays_closer_to_the_image(pipe):
    distances = []
    for strength in (0.25, 0.5, 0.75, 1.0):
        hook = Img2Img(picture(), strength)
        out = pipe(PROMPT, steps=4, output_type="latent", generator=_gen(0), conditioning=hook, **KW).images
        distances.append((out - hook.latents).abs().mean().item())  # the encoded image, in latent space
    assert distances == sorted(distances)
    assert distances[0] < 0.5 * distances[-1]


# -- inpainting --------------------------------------------------------------------------------------------------------
def test_inpaint_keeps_the_image_outside_the_mask(pipe):
    hook = Inpaint(picture(), right_half_mask(), strength=0.9)
    out = pipe(PROMPT, steps=4, output_type="latent", generator=_gen(1), conditioning=hook, **KW).images
    keep = hook.mask == 0  # [B, L, 64] packed latent elements outside the mask
    assert 0 < keep.sum() < keep.numel()
    assert torch.equal(out[keep], hook.latents[keep])  # exactly the encoded image after the last blend
    assert (out[~keep] - hook.latents[~keep]).abs().mean() > 0.1
    # In pixels only up to the decoder, whose mid-block attention mixes all positions: outside still changes less.
    pixels = pipe.decode(sampling.unpack(out, 4, 6), "pt")
    round_trip = pipe.decode(sampling.unpack(hook.latents, 4, 6), "pt")
    err = (pixels - round_trip).abs().mean(1)[0]  # [H, W]
    assert err[:, :24].mean() < 0.8 * err[:, 24:].mean()


# -- Fill --------------------------------------------------------------------------------------------------------------
def test_fill_mask_packing_matches_a_direct_construction():
    f, (b, height, width) = 8, (2, 32, 48)
    mask = (torch.rand(b, 1, height, width, generator=_gen(0)) > 0.5).float()
    packed = pack_mask(mask, f)
    h2, w2 = height // 16, width // 16
    expected = torch.empty(b, h2 * w2, 4 * f * f)
    for r in range(h2):
        for c in range(w2):
            for py in range(f):
                for px in range(f):
                    for dy in range(2):
                        for dx in range(2):
                            # latent pixel (2r+dy, 2c+dx), its sub-pixel (py, px) -> channel (py*f+px)*4 + dy*2 + dx
                            pixel = mask[:, 0, (2 * r + dy) * f + py, (2 * c + dx) * f + px]
                            expected[:, r * w2 + c, (py * f + px) * 4 + dy * 2 + dx] = pixel
    assert torch.equal(packed, expected)


def test_fill_model_input_is_latents_masked_latents_and_mask(pipe):
    fill_pipe = _variant(pipe, 384)
    hook = Fill(picture(), right_half_mask())
    size, ids = (4, 6), sampling.image_ids(1, 2, 3)
    sigmas = sampling.get_schedule(2, 6, shift=None)
    gen = _gen(0)
    hook.encode(fill_pipe, 1, gen, size)
    noise = sampling.pack(torch.randn(1, 16, 4, 6, generator=gen))
    x, _, _, start = hook.prepare(fill_pipe, noise, ids, sigmas, gen, size)
    inp = hook.model_input(x)
    assert start == 0 and inp.shape == (1, 6, 384)
    assert torch.equal(inp[..., :64], noise)  # strength 1: the noise itself
    assert torch.equal(inp[..., 128:], pack_mask(to_mask(right_half_mask(), (32, 48), "m"), 8))
    out = fill_pipe(PROMPT, steps=2, generator=_gen(0), conditioning=hook, output_type="np", **KW)
    assert out.images.shape == (1, 32, 48, 3)


def test_pad_for_outpaint():
    image = picture(32, 32)
    padded, mask = pad_for_outpaint(image, left=16, bottom=16)
    assert padded.size == mask.size == (48, 48)
    assert np.array_equal(np.asarray(padded)[:32, 16:], np.asarray(image))
    m = np.asarray(mask)
    assert (m[:32, 16:] == 0).all() and (m[:, :16] == 255).all() and (m[32:] == 255).all()
    with pytest.raises(ValueError, match="left"):
        pad_for_outpaint(image, left=-1)


# -- Control, Kontext, composition, model layouts ----------------------------------------------------------------------
def test_control_steers_the_image_and_composes_with_img2img(pipe):
    ctrl_pipe = _variant(pipe, 128)
    args = dict(steps=2, output_type="np", **KW)
    a = ctrl_pipe(PROMPT, generator=_gen(0), conditioning=Control(picture(seed=0)), **args).images
    b = ctrl_pipe(PROMPT, generator=_gen(0), conditioning=Control(picture(seed=1)), **args).images
    assert np.abs(a - b).max() > 1e-3
    both = Compose(Control(picture(seed=0)), Img2Img(picture(seed=2), strength=0.5))
    c = ctrl_pipe(PROMPT, generator=_gen(0), conditioning=both, **args).images
    assert c.shape == a.shape and np.abs(a - c).max() > 1e-3


def test_hooks_check_the_model_layout(pipe):
    with pytest.raises(ValueError, match="img_in width 128.*takes 64"):
        pipe(PROMPT, steps=1, conditioning=Control(picture()), **KW)
    with pytest.raises(ValueError, match="no conditioning.*Fill model"):
        _variant(pipe, 384)(PROMPT, steps=1, **KW)
    with pytest.raises(ValueError, match="more than one hook sets the start"):
        Compose(Img2Img(picture()), Inpaint(picture(), right_half_mask()))
    with pytest.raises(ValueError, match="Kontext"):
        _variant(pipe, 128)(PROMPT, steps=1, conditioning=Compose(Control(picture()), Kontext(picture())), **KW)


def test_kontext_ids_token_counts_and_noise_only_shift(pipe):
    hook = Kontext(picture(64, 32))  # context 64x32 px -> 4x2 tokens; generation 32x48 px -> 2x3 tokens
    seen = []
    pipe(PROMPT, steps=3, generator=_gen(0), conditioning=hook, output_type="latent",
         callback_on_step_end=lambda p, i, t, kw: seen.append(float(t) / 1000) or kw, **KW)  # fmt: skip
    ids = hook.prepare(pipe, torch.zeros(1, 6, 64), sampling.image_ids(1, 2, 3), None, None, (4, 6))[1]
    assert ids.shape == (1, 6 + 8, 3)
    assert torch.equal(ids[0, :6], sampling.image_ids(1, 2, 3)[0])
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(2.0), indexing="ij")
    assert torch.equal(ids[0, 6:], torch.stack([torch.ones(8), rows.flatten(), cols.flatten()], dim=1))
    assert hook.model_input(torch.zeros(1, 6, 64)).shape == (1, 14, 64)
    # mu from the 6 noise tokens, not the 14 in the sequence
    expected = sampling.get_schedule(3, 6, shift=pipe.scheduler.shift)[:3]
    assert np.allclose(seen, expected.tolist(), atol=1e-6)
    with pytest.raises(ValueError, match="multiples of 16"):
        pipe(PROMPT, steps=1, conditioning=Kontext(picture(40, 40)), **KW)


def test_kontext_pipeline_sizes():
    assert kontext_size(1024, 1024, 1024**2) == (1024, 1024)
    assert kontext_size(500, 1000, 1024**2) == (720, 1456)  # 2:1 -> (w, h) = (1456, 720)
    assert kontext_size(500, 1000, 128**2) == (80, 176)  # the same shape for a 128^2 model, floored to 16


# -- image inputs and the pipelines' arguments -------------------------------------------------------------------------
def test_image_inputs():
    t = torch.rand(3, 32, 48)
    assert torch.allclose(to_pixels(t, (32, 48), "image"), t[None] * 2 - 1)
    from_pil = to_pixels(picture(), (32, 48), "image")
    assert from_pil.shape == (1, 3, 32, 48) and from_pil.min() >= -1 and from_pil.max() <= 1
    assert to_pixels(picture(64, 96), (32, 48), "image").shape == (1, 3, 32, 48)  # PIL images are resized
    assert set(to_mask(torch.tensor([[0.2, 0.5], [0.7, 0.0]]), (2, 2), "m").unique().tolist()) == {0.0, 1.0}
    with pytest.raises(ValueError, match="is 16x16 but the image is 32x48"):
        to_pixels(torch.rand(3, 16, 16), (32, 48), "image")
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        Img2Img(torch.rand(3, 32, 48) * 2 - 1)
    with pytest.raises(ValueError, match="PIL image"):
        Img2Img("photo.png")


def test_pipeline_arguments_and_batching(pipe, tiny_dev_folder):
    i2i = FluxImg2ImgPipeline.from_pretrained(tiny_dev_folder, torch_dtype=torch.float32)
    with pytest.raises(ValueError, match="image is required"):
        i2i(PROMPT, steps=1)
    with pytest.raises(ValueError, match="pass height= and width="):
        i2i(PROMPT, image=picture(40, 40), steps=1)
    prompts = [PROMPT, "a small green star"]
    args = dict(image=picture(), strength=0.6, steps=3, output_type="np")
    whole = i2i(prompts, generator=[_gen(1), _gen(2)], **args).images
    chunked = i2i(prompts, generator=[_gen(1), _gen(2)], batch_size=1, **args).images
    assert whole.shape == (2, 32, 48, 3) and np.abs(whole - chunked).max() <= 1 / 255
    kontext = FluxKontextPipeline.from_pretrained(tiny_dev_folder, torch_dtype=torch.float32)
    out = kontext(picture(32, 64), PROMPT, max_area=32 * 64, _auto_resize=False, steps=1, output_type="np")
    assert out.images.shape == (1, 32, 64, 3)  # default size: the context image's


# -- structure extraction ----------------------------------------------------------------------------------------------
def test_canny_finds_the_rectangle_border():
    from fluxkit.control import canny

    a = np.zeros((48, 64, 3), np.uint8)
    a[12:36, 16:48] = 255
    edges = np.asarray(canny(Image.fromarray(a)))[..., 0] > 0
    assert edges.shape == (48, 64)
    border = np.zeros_like(edges)
    border[10:38, 14:50] = True
    border[14:34, 18:46] = False
    assert edges[border].mean() > 0.3 and not edges[~border].any()


def test_depth_map_from_user_and_missing_model(tmp_path):
    from fluxkit.control import depth_to_image, estimate_depth

    depth = torch.linspace(2.0, 5.0, 20)[None].expand(10, 20)
    img = np.asarray(depth_to_image(depth, size=(20, 40)))
    assert img.shape == (20, 40, 3) and img.min() == 0 and img.max() == 255
    with pytest.raises(FileNotFoundError, match="not available locally"):
        estimate_depth(picture(), model=str(tmp_path / "no-such-model"))


def test_depth_estimation_with_a_local_model(tmp_path):
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    from fluxkit.control import estimate_depth

    backbone = Dinov2Config(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37, image_size=56,
        patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"], reshape_hidden_states=False,
    )  # fmt: skip
    config = DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 16, 32],
        fusion_hidden_size=16, head_hidden_size=8, patch_size=14,
    )  # fmt: skip
    torch.manual_seed(0)
    DepthAnythingForDepthEstimation(config).save_pretrained(tmp_path)
    DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14).save_pretrained(
        tmp_path
    )
    depth = estimate_depth(picture(), model=str(tmp_path))
    assert depth.size == (48, 32) and depth.mode == "RGB"
