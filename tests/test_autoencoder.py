"""The autoencoder: checkpoint layout, parity with diffusers' AutoencoderKL (the oracle), slicing and tiling."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from fluxkit.autoencoder import AutoEncoder, blend_weights, run_tiled, seam_error, seam_mask, tile_starts
from fluxkit.convert import vae_bfl_to_diffusers, vae_diffusers_to_bfl
from fluxkit.params import TEST_AE, TINY_AE, AutoEncoderParams

# Four levels (8x, every block kind incl. both nin_shortcuts) at test size, with the real scale/shift.
PARITY_AE = AutoEncoderParams(ch=16, ch_mult=(1, 2, 4, 4), num_res_blocks=2, norm_groups=8)


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def pair():
    """A random diffusers AutoencoderKL in the Flux layout and our AutoEncoder loaded strictly from its weights."""
    from diffusers import AutoencoderKL

    p, n = PARITY_AE, len(PARITY_AE.ch_mult)
    torch.manual_seed(0)
    theirs = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(p.ch * m for m in p.ch_mult),
        layers_per_block=p.num_res_blocks, latent_channels=p.z_channels, norm_num_groups=p.norm_groups,
        scaling_factor=p.scale_factor, shift_factor=p.shift_factor, use_quant_conv=False, use_post_quant_conv=False,
        mid_block_add_attention=True,
    ).eval()
    with torch.no_grad():  # GroupNorms start at (1, 0): perturb everything so a swapped norm cannot hide
        for param in theirs.parameters():
            param.add_(0.1 * torch.randn_like(param))
    ours = AutoEncoder(p).eval()
    ours.load_state_dict(vae_diffusers_to_bfl(theirs.state_dict()), strict=True)
    return ours, theirs


def test_default_params_match_ae_safetensors_layout():
    with torch.device("meta"):
        ae = AutoEncoder(AutoEncoderParams())
    sd = ae.state_dict()
    assert len(sd) == 244
    assert sum(t.numel() for t in sd.values()) == 83_819_683
    assert sd["encoder.conv_out.weight"].shape == (32, 512, 3, 3)  # 2 * z_channels: mean and logvar
    assert sd["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert sd["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)  # finest level, run last
    assert sd["decoder.up.3.block.2.conv2.weight"].shape == (512, 512, 3, 3)  # coarsest level, run first
    assert "decoder.up.0.upsample.conv.weight" not in sd and "encoder.down.3.downsample.conv.weight" not in sd
    assert not any("quant" in k for k in sd)


def test_state_dict_converts_back_to_diffusers(pair):
    ours, theirs = pair
    back = vae_bfl_to_diffusers(ours.state_dict())
    ref = theirs.state_dict()
    assert back.keys() == ref.keys()
    assert all(torch.equal(back[k], ref[k]) for k in ref)


def test_shapes_follow_params():
    ae = AutoEncoder(TEST_AE)  # ch_mult (1, 2): 2x down
    x = torch.rand(2, 3, 24, 40) * 2 - 1
    z = ae.encode(x)
    assert z.shape == (2, TEST_AE.z_channels, 12, 20)
    assert ae.decode(z).shape == x.shape
    assert ae.encoder.mid.attn_1.norm.num_groups == TEST_AE.norm_groups


def test_encode_decode_match_diffusers(pair):
    ours, theirs = pair
    p = ours.params
    x = torch.rand(2, 3, 48, 32) * 2 - 1
    with torch.no_grad():
        dist = theirs.encode(x).latent_dist
        # diffusers' pipeline convention for the scaled latent
        z_ref = (dist.mean - theirs.config.shift_factor) * theirs.config.scaling_factor
        z = ours.encode(x)
        assert _rel_err(z, z_ref) <= 1e-5
        mean, logvar = ours.encode_moments(x)
        assert _rel_err(logvar, dist.logvar) <= 1e-5
        latents = torch.randn_like(z)
        x_ref = theirs.decode(latents / theirs.config.scaling_factor + theirs.config.shift_factor).sample
        assert _rel_err(ours.decode(latents), x_ref) <= 1e-5
        assert _rel_err(ours(x), theirs.decode(dist.mean).sample) <= 1e-5
    assert p.scale_factor != 1.0 and p.shift_factor != 0.0  # the test exercises the scale/shift convention


@pytest.mark.parametrize("generators", [1, 2], ids=["one-generator", "generator-per-image"])
def test_sampled_encode_draws_like_diffusers(pair, generators):
    ours, theirs = pair
    x = torch.rand(2, 3, 32, 32) * 2 - 1

    def gen():
        g = [torch.Generator().manual_seed(7 + i) for i in range(generators)]
        return g[0] if generators == 1 else g

    g_ref, g_ours = gen(), gen()
    with torch.no_grad():
        sample = theirs.encode(x).latent_dist.sample(g_ref)
        z_ref = (sample - theirs.config.shift_factor) * theirs.config.scaling_factor
        z = ours.encode(x, sample=True, generator=g_ours)
    assert _rel_err(z, z_ref) <= 1e-5
    assert not torch.allclose(z, ours.encode(x))  # the draw really moved the latent off the mean
    first_ref, first_ours = (g_ref[0], g_ours[0]) if generators > 1 else (g_ref, g_ours)
    assert torch.equal(first_ref.get_state(), first_ours.get_state())  # consumed identically


def test_encode_rejects_bad_arguments():
    ae = AutoEncoder(TEST_AE)
    x = torch.zeros(2, 3, 16, 16)
    with pytest.raises(ValueError, match="sample=False"):
        ae.encode(x, generator=torch.Generator())
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        ae.encode(x, sample=True, generator=[torch.Generator() for _ in range(3)])
    with pytest.raises(ValueError, match=r"x must be \[B, 3, H, W\]"):
        ae.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"z must be \[B, 16, h, w\]"):
        ae.decode(torch.zeros(1, 4, 8, 8))


def test_slicing_matches_batched():
    torch.manual_seed(0)
    ae = AutoEncoder(TEST_AE).eval()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z, x_hat = ae.encode(x), ae.decode(torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(1)))
        drawn = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(2))
        ae.enable_slicing()
        torch.testing.assert_close(ae.encode(x), z, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ae.decode(torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(1))),
                                   x_hat, rtol=1e-5, atol=1e-6)
        # The noise is drawn once for the whole batch after encoding, so slicing does not change the draw.
        torch.testing.assert_close(ae.encode(x, sample=True, generator=torch.Generator().manual_seed(2)), drawn,
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("length,tile,overlap", [(32, 16, 4), (33, 16, 4), (100, 64, 16), (16, 16, 4), (9, 16, 4),
                                                 (40, 16, 0)])
def test_tile_starts_cover_with_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and min(starts[-1] + tile, length) == length
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # neighbours share >= overlap
    assert all(b > a for a, b in zip(starts, starts[1:]))
    assert len(starts) == 1 or starts[-1] + tile == length  # the last tile is whole, not a leftover strip


def test_blend_is_a_partition_of_unity():
    """Tiling an exactly local function must reproduce it: identity, and a 2x upsample landing at the right place."""
    x = torch.randn(2, 3, 37, 29)
    torch.testing.assert_close(run_tiled(lambda t: t, x, (37, 29), tile=12, overlap=3, in_scale=1, out_scale=1), x)
    up = run_tiled(lambda t: F.interpolate(t, scale_factor=2.0), x, (37, 29), tile=12, overlap=3, in_scale=1,
                   out_scale=2)
    torch.testing.assert_close(up, F.interpolate(x, scale_factor=2.0))
    weights = blend_weights([0, 8, 16], tile=16, length=32, scale=8)
    ramp = (torch.arange(64) + 0.5) / 64  # a linear cross-fade over the 8-latent (64-px) overlap
    torch.testing.assert_close(weights[1][:64], ramp)
    torch.testing.assert_close(weights[0][-64:], ramp.flip(0))
    assert weights[0][0] == 1 and weights[2][-1] == 1  # image borders are not faded


def test_tiling_validation_and_small_inputs_untouched():
    ae = AutoEncoder(TEST_AE).eval()
    for bad in ({"tile_size": 0}, {"tile_size": 33}, {"tile_size": 32, "overlap": 20}, {"tile_size": 32, "overlap": 3}):
        with pytest.raises(ValueError, match="tile_size|overlap"):
            ae.enable_tiling(**bad)
    z = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        ref = ae.decode(z)
        ae.enable_tiling(tile_size=16, overlap=4)  # 16 px = the whole 16x16 output: no tiling
        assert torch.equal(ae.decode(z), ref)
        ae.enable_tiling(tile_size=8, overlap=2)
        with pytest.raises(ValueError, match="divisible by 2"):
            ae.encode(torch.zeros(1, 3, 17, 16))


def test_tiled_decode_close_to_untiled_without_seams():
    """Tiny random 8x AE, 256x256 output in 128-px tiles (3x3 tiles, 64-px actual overlap).

    Measured (seed 0): max |err| 0.40, mean 0.070 (output std 0.33), seam-band mean 0.074 vs interior 0.060. The
    error is spread over whole tiles (each tile normalises and attends only within itself), not concentrated at the
    seams; with hard cuts (overlap 0) the seam-band mean is ~3x the interior one, which the metric must detect.
    """
    torch.manual_seed(0)
    ae = AutoEncoder(TINY_AE).eval()
    z = torch.randn(1, 16, 32, 32)
    with torch.no_grad():
        ref = ae.decode(z)
        ae.enable_tiling(tile_size=128, overlap=32)
        blended = seam_error(ae, ref, ae.decode(z))
        ae.enable_tiling(tile_size=128, overlap=0)
        hard = seam_error(ae, ref, ae.decode(z))
    assert blended["mean"] < 0.3 * ref.std().item() and blended["max"] < 0.6
    assert blended["seam_mean"] < 1.5 * blended["interior_mean"]
    assert hard["seam_mean"] > 2.5 * hard["interior_mean"]
    assert hard["seam_mean"] > 3 * blended["seam_mean"]


def test_tiled_encode_close_to_untiled_and_composes_with_slicing():
    torch.manual_seed(0)
    ae = AutoEncoder(replace(TINY_AE, scale_factor=1.0, shift_factor=0.0)).eval()
    x = torch.rand(2, 3, 192, 160) * 2 - 1
    with torch.no_grad():
        ref = ae.encode(x)
        ae.enable_tiling(tile_size=96, overlap=32)
        ae.enable_slicing()
        tiled = ae.encode(x)
    assert tiled.shape == ref.shape
    assert (tiled - ref).abs().mean() < 0.3 * ref.std()


def test_seam_mask_marks_overlaps():
    mask = seam_mask(256, 128, tile_size=128, overlap=32, downscale=8)  # rows: starts 0, 8, 16 (latents)
    assert mask[64:128, 0].all() and mask[128:192, 0].all() and not mask[0:64, 0].any()
    assert mask[0, :].sum() == 0 and mask[:, 5].sum() == 128  # the width fits in one tile


def test_decoder_casts_to_up_dtype():
    ae = AutoEncoder(TEST_AE).eval()
    for module in (ae.decoder.up, ae.decoder.norm_out, ae.decoder.conv_out):
        module.double()
    with torch.no_grad():
        assert ae.decode(torch.randn(1, 16, 4, 4)).dtype == torch.float64
        assert ae.to(torch.bfloat16).decode(torch.randn(1, 16, 4, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16
