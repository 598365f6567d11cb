"""Key conversion BFL <-> diffusers: exact round trips, the mapping's semantics, size inference and loud failures."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fluxkit.convert import (
    ae_params_from_state_dict,
    detect_layout,
    detect_network,
    detect_variant,
    expected_ae_shapes,
    expected_bfl_shapes,
    flux_params_from_state_dict,
    strip_prefix,
    transformer_bfl_to_diffusers,
    transformer_diffusers_to_bfl,
    vae_bfl_to_diffusers,
    vae_diffusers_to_bfl,
)
from fluxkit.params import FLUX_DEV, FLUX_SCHNELL, AutoEncoderParams, FluxParams

AXES = (4, 6, 6)


def tiny_params(guidance: bool) -> FluxParams:
    return FluxParams(in_channels=64, vec_in_dim=32, context_in_dim=48, hidden_size=32, num_heads=2, depth=2,
                      depth_single_blocks=2, axes_dim=AXES, guidance_embed=guidance)


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values everywhere (diffusers zero-initialises some layers, which would hide a wrong mapping)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return module


def tiny_diffusers_transformer(guidance: bool):
    from diffusers import FluxTransformer2DModel

    return randomize(FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=48, pooled_projection_dim=32, axes_dims_rope=AXES, guidance_embeds=guidance))


def tiny_diffusers_vae():
    from diffusers import AutoencoderKL

    return randomize(AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16), layers_per_block=1,
        latent_channels=16, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False))


def meta_state_dict(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


@pytest.fixture(scope="module", params=[True, False], ids=["dev", "schnell"])
def diffusers_sd(request):
    return request.param, tiny_diffusers_transformer(request.param).state_dict()


# ---- expected tables ------------------------------------------------------------------------------------------------


def test_expected_tables_match_the_real_checkpoints():
    dev, schnell = expected_bfl_shapes(FLUX_DEV), expected_bfl_shapes(FLUX_SCHNELL)
    assert (len(dev), len(schnell)) == (780, 776)
    assert set(dev) - set(schnell) == {f"guidance_in.{layer}.{p}" for layer in ("in_layer", "out_layer")
                                      for p in ("weight", "bias")}
    numel = lambda shapes: sum(torch.Size(s).numel() for s in shapes.values())  # noqa: E731
    assert numel(dev) == 11_901_408_320 and numel(schnell) == 11_891_178_560  # spec §1.1
    assert dev["single_blocks.37.linear1.weight"] == (21504, 3072)
    assert dev["double_blocks.18.img_attn.norm.key_norm.scale"] == (128,)
    assert expected_bfl_shapes(replace(FLUX_DEV, in_channels=384))["img_in.weight"] == (3072, 384)
    ae = expected_ae_shapes(AutoEncoderParams())
    assert len(ae) == 244 and numel(ae) == 83_819_683  # spec §3.1
    assert ae["decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert "decoder.up.0.upsample.conv.weight" not in ae and "encoder.down.3.downsample.conv.weight" not in ae


@pytest.mark.parametrize("params", [FLUX_DEV, FLUX_SCHNELL, replace(FLUX_DEV, in_channels=384),
                                    replace(FLUX_DEV, in_channels=128)], ids=["dev", "schnell", "fill", "control"])
def test_params_and_variant_inferred_from_real_sized_shapes(params):
    sd = meta_state_dict(expected_bfl_shapes(params))
    assert flux_params_from_state_dict(sd) == params  # axes (16, 56, 56) follow from head_dim 128
    variant = {384: "fill", 128: "control"}.get(params.in_channels, "dev" if params.guidance_embed else "schnell")
    assert detect_variant(sd) == variant
    assert detect_variant(transformer_bfl_to_diffusers(sd)) == variant


# ---- transformer ----------------------------------------------------------------------------------------------------


def test_transformer_round_trip_is_exact(diffusers_sd):
    guidance, sd = diffusers_sd
    bfl = transformer_diffusers_to_bfl(sd)
    assert {k: tuple(v.shape) for k, v in bfl.items()} == expected_bfl_shapes(tiny_params(guidance))
    back = transformer_bfl_to_diffusers(bfl)
    assert back.keys() == sd.keys()
    for key, tensor in sd.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key


def test_transformer_mapping_semantics(diffusers_sd):
    _, sd = diffusers_sd
    bfl = transformer_diffusers_to_bfl(sd)
    d, s = "transformer_blocks.1.attn", "single_transformer_blocks.0"
    fused = torch.cat([sd[f"{d}.add_{c}_proj.weight"] for c in "qkv"])  # text stream: q, k, v rows in order
    assert torch.equal(bfl["double_blocks.1.txt_attn.qkv.weight"], fused)
    linear1 = torch.cat([sd[f"{s}.attn.to_q.bias"], sd[f"{s}.attn.to_k.bias"], sd[f"{s}.attn.to_v.bias"],
                         sd[f"{s}.proj_mlp.bias"]])
    assert torch.equal(bfl["single_blocks.0.linear1.bias"], linear1)
    assert torch.equal(bfl["double_blocks.1.txt_attn.norm.key_norm.scale"], sd[f"{d}.norm_added_k.weight"])
    assert torch.equal(bfl["double_blocks.1.img_mlp.2.weight"], sd["transformer_blocks.1.ff.net.2.weight"])
    # Final adaLN: BFL rows are [shift; scale], diffusers' [scale; shift].
    ada, norm_out = bfl["final_layer.adaLN_modulation.1.weight"], sd["norm_out.linear.weight"]
    assert torch.equal(ada[:32], norm_out[32:]) and torch.equal(ada[32:], norm_out[:32])


def test_transformer_params_inferred_from_either_layout(diffusers_sd):
    guidance, sd = diffusers_sd
    assert flux_params_from_state_dict(sd, axes_dim=AXES) == tiny_params(guidance)
    assert flux_params_from_state_dict(transformer_diffusers_to_bfl(sd), axes_dim=AXES) == tiny_params(guidance)
    with pytest.raises(ValueError, match="axes_dim.*head_dim 16"):
        flux_params_from_state_dict(sd)


def test_transformer_conversion_rejects_mismatches(diffusers_sd):
    guidance, sd = diffusers_sd
    extra = {**sd, "transformer_blocks.0.attn.to_qkv_lora.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"1 unexpected keys: transformer_blocks\.0\.attn\.to_qkv_lora\.weight"):
        transformer_diffusers_to_bfl(extra)
    missing = {k: v for k, v in sd.items() if k != "single_transformer_blocks.1.proj_mlp.bias"}
    with pytest.raises(ValueError, match=r"1 missing keys: single_transformer_blocks\.1\.proj_mlp\.bias"):
        transformer_diffusers_to_bfl(missing)
    bfl = transformer_diffusers_to_bfl(sd)
    bfl["double_blocks.0.img_attn.qkv.weight"] = torch.zeros(96, 31)
    with pytest.raises(ValueError, match=r"double_blocks\.0\.img_attn\.qkv\.weight \(96, 31\) \(expected \(96, 32\)\)"):
        transformer_bfl_to_diffusers(bfl)
    # Given params that do not fit (one more block) are caught too, and long listings are cut short.
    with pytest.raises(ValueError, match=r"missing keys: .*\(\d+ more\)"):
        transformer_diffusers_to_bfl(sd, replace(tiny_params(guidance), depth=3))


def test_bfl_without_qkv_bias_has_no_diffusers_form():
    sd = meta_state_dict(expected_bfl_shapes(replace(tiny_params(True), qkv_bias=False)))
    assert flux_params_from_state_dict(sd, axes_dim=AXES).qkv_bias is False
    with pytest.raises(ValueError, match="qkv_bias=False"):
        transformer_bfl_to_diffusers(sd)


# ---- layout detection and prefixes ----------------------------------------------------------------------------------


def test_detection_and_prefixes(diffusers_sd):
    _, sd = diffusers_sd
    bfl = transformer_diffusers_to_bfl(sd)
    assert (detect_layout(sd), detect_layout(bfl)) == ("diffusers", "bfl")
    ae = meta_state_dict(expected_ae_shapes(AutoEncoderParams()))
    assert (detect_network(ae), detect_layout(ae), detect_layout(vae_bfl_to_diffusers(ae))) == (
        "autoencoder", "bfl", "diffusers")
    with pytest.raises(ValueError, match="no known key markers"):
        detect_layout(["foo.weight", "bar.bias"])
    with pytest.raises(ValueError, match="conflicting"):
        detect_layout(["img_in.weight", "x_embedder.weight"])
    for prefix in ("model.diffusion_model.", "diffusion_model."):
        assert strip_prefix({prefix + k: v for k, v in bfl.items()}).keys() == bfl.keys()
    assert strip_prefix(bfl).keys() == bfl.keys()
    with pytest.raises(ValueError, match=r"1 keys lack the 'model\.diffusion_model\.' prefix.*first_stage_model"):
        strip_prefix({"model.diffusion_model.img_in.weight": 0, "first_stage_model.conv.weight": 0})


# ---- autoencoder ----------------------------------------------------------------------------------------------------


def test_vae_round_trip_is_exact():
    sd = tiny_diffusers_vae().state_dict()
    bfl = vae_diffusers_to_bfl(sd)
    params = AutoEncoderParams(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=4)
    assert ae_params_from_state_dict(bfl, norm_groups=4) == params == ae_params_from_state_dict(sd, norm_groups=4)
    assert {k: tuple(v.shape) for k, v in bfl.items()} == expected_ae_shapes(params)
    back = vae_bfl_to_diffusers(bfl)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], v) for k, v in sd.items())


def test_vae_mapping_semantics():
    sd = tiny_diffusers_vae().state_dict()
    bfl = vae_diffusers_to_bfl(sd)
    # Decoder levels are numbered in reverse: BFL up.0 (finest, no upsample) is diffusers' last up block.
    assert torch.equal(bfl["decoder.up.0.block.1.conv2.weight"], sd["decoder.up_blocks.2.resnets.1.conv2.weight"])
    assert torch.equal(bfl["decoder.up.2.upsample.conv.bias"], sd["decoder.up_blocks.0.upsamplers.0.conv.bias"])
    assert torch.equal(bfl["decoder.up.0.block.0.nin_shortcut.weight"],
                       sd["decoder.up_blocks.2.resnets.0.conv_shortcut.weight"])
    # Mid-block attention: a Linear in diffusers, a 1x1 conv in BFL.
    q = bfl["encoder.mid.attn_1.q.weight"]
    assert q.shape == (16, 16, 1, 1) and torch.equal(q[:, :, 0, 0], sd["encoder.mid_block.attentions.0.to_q.weight"])
    assert torch.equal(bfl["encoder.norm_out.weight"], sd["encoder.conv_norm_out.weight"])


def test_vae_conversion_rejects_mismatches():
    sd = tiny_diffusers_vae().state_dict()
    with pytest.raises(ValueError, match=r"unexpected keys: quant_conv\.weight"):
        vae_diffusers_to_bfl({**sd, "quant_conv.weight": torch.zeros(32, 32, 1, 1)})
    with pytest.raises(ValueError, match=r"missing keys: decoder\.up_blocks\.0\.upsamplers\.0\.conv\.weight"):
        vae_diffusers_to_bfl({k: v for k, v in sd.items() if k != "decoder.up_blocks.0.upsamplers.0.conv.weight"})
    bfl = vae_diffusers_to_bfl(sd)
    bfl["decoder.mid.attn_1.v.weight"] = torch.zeros(16, 16)  # a Linear-shaped weight where BFL has a 1x1 conv
    with pytest.raises(ValueError, match=r"decoder\.mid\.attn_1\.v\.weight \(16, 16\) \(expected \(16, 16, 1, 1\)\)"):
        vae_bfl_to_diffusers(bfl)
